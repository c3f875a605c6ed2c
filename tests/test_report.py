"""The report's pure parts: FID-vs-step curves and which runs the tables show."""

from redi.report import fid_curves, table_frames


def record(name, fid, steps, curve=None, tables=("runs",), label=None):
    return {"run": label or name, "name": name, "curve": curve or name, "tables": list(tables),
            "model": "SiT-S/2", "steps": steps, "FID": fid, "train_dir": None, "grid": ""}


def test_points_join_their_runs_curve_sorted_by_step():
    records = [record("redi", 20.0, 800, label="ReDi"), record("base", 30.0, 800),
               record("redi-step400", 35.0, 400, curve="redi", tables=()),
               record("redi-step200", 50.0, 200, curve="redi", tables=()),
               record("broken", None, 800)]
    assert fid_curves(records) == {"ReDi": [(200, 50.0), (400, 35.0), (800, 20.0)], "base": [(800, 30.0)]}


def test_tables_hold_only_runs_that_name_them():
    records = [record("a", 1.0, 10), record("b", 2.0, 20, tables=("runs", "x")),
               record("a-step5", 3.0, 5, curve="a", tables=())]
    tables = table_frames(records)
    assert list(tables) == ["runs", "x"]
    assert list(tables["runs"]["run"]) == ["a", "b"] and list(tables["x"]["run"]) == ["b"]
    assert "curve" not in tables["runs"].columns and "steps" in tables["runs"].columns  # steps vary
