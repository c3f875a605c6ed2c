"""redi.h5store.ResumableH5: rows in any order, atomic finish, safe resume."""

import h5py
import numpy as np
import pytest

from redi.errors import ReDiError
from redi.h5store import ResumableH5

N = 50
DATASETS = {"x": ((3, 2), "float32"), "label": ((), "int64")}
ATTRS = {"seed": 3, "flip": True, "scale": 0.5, "name": None}


def reference(n: int = N) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 3, 2)).astype(np.float32), rng.integers(0, 1000, n)


def open_store(path, n=N, datasets=None, attrs=None, chunk_rows=8, code="code-a") -> ResumableH5:
    attrs = ATTRS if attrs is None else attrs
    return ResumableH5(path, n, datasets or DATASETS, attrs, chunk_rows, code=code)


def shuffled_batches(rows: np.ndarray, seed: int, size: int = 7) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(rows)
    return [order[i : i + size] for i in range(0, len(order), size)]


def test_shuffled_batches_land_at_their_rows(tmp_path):
    x, label = reference()
    path = tmp_path / "out.h5"
    store = open_store(path)
    assert store.todo.dtype == bool and store.todo.shape == (N,) and store.todo.all()
    batches = shuffled_batches(np.arange(N), seed=1)
    # also a contiguous batch given out of order and a batch of one
    batches = [np.array([12, 10, 11])] + [
        b[~np.isin(b, [10, 11, 12])] for b in batches
    ]
    batches = [b for b in batches if len(b)]
    written = np.zeros(N, dtype=bool)
    for batch in batches:
        store.write(batch, x=x[batch], label=label[batch])
        written[batch] = True
        np.testing.assert_array_equal(store.todo, ~written)
    assert not store.todo.any()
    store.finish()
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["x"][:], x)
        np.testing.assert_array_equal(f["label"][:], label)
        assert f["x"].dtype == np.float32 and f["label"].dtype == np.int64
        assert f["x"].shape == (N, 3, 2) and f["label"].shape == (N,)
        assert f["done"][:].all()
        assert f.attrs["seed"] == 3 and bool(f.attrs["flip"]) and f.attrs["scale"] == 0.5
        assert f.attrs["name"] == ""


def test_final_file_appears_only_after_finish(tmp_path):
    x, label = reference()
    path = tmp_path / "nested" / "out.h5"
    partial = tmp_path / "nested" / "out.h5.partial"
    store = open_store(path)
    assert partial.exists() and not path.exists()
    store.write(np.arange(N), x=x, label=label)
    assert partial.exists() and not path.exists()
    store.finish()
    assert path.exists() and not partial.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.h5"]


def test_close_and_reopen_resumes(tmp_path):
    x, label = reference()
    path = tmp_path / "out.h5"
    first = np.array([40, 3, 17, 4, 5, 6, 33])
    store = open_store(path)
    store.write(first, x=x[first], label=label[first])
    store.close()
    assert not path.exists()

    store = open_store(path)
    expected_todo = np.ones(N, dtype=bool)
    expected_todo[first] = False
    np.testing.assert_array_equal(store.todo, expected_todo)
    np.testing.assert_array_equal(store.file["x"][np.sort(first)], x[np.sort(first)])
    rest = np.flatnonzero(store.todo)
    for batch in shuffled_batches(rest, seed=2, size=9):
        store.write(batch, x=x[batch], label=label[batch])
    store.finish()
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["x"][:], x)
        np.testing.assert_array_equal(f["label"][:], label)


def test_rewriting_a_done_row_overwrites_it(tmp_path):
    x, label = reference()
    store = open_store(tmp_path / "out.h5")
    store.write(np.arange(N), x=np.zeros_like(x), label=np.zeros_like(label))
    store.write(np.array([9, 2]), x=x[[9, 2]], label=label[[9, 2]])
    np.testing.assert_array_equal(store.file["x"][[2, 9]], x[[2, 9]])
    np.testing.assert_array_equal(store.file["x"][3], 0)
    store.close()


@pytest.mark.parametrize(
    "change",
    [
        {"attrs": {**ATTRS, "seed": 4}},
        {"attrs": {**ATTRS, "flip": False}},
        {"attrs": {**ATTRS, "name": "other"}},
        {"attrs": {**ATTRS, "new_setting": 1}},
        {"datasets": {"x": ((3, 3), "float32"), "label": ((), "int64")}},
        {"datasets": {"x": ((3, 2), "float16"), "label": ((), "int64")}},
        {"datasets": {**DATASETS, "extra": ((2,), "float32")}},
        {"n": N + 1},
    ],
    ids=["attr-value", "attr-bool", "attr-none", "attr-new", "shape", "dtype", "dataset-new", "rows"],
)
def test_reopen_with_other_settings_is_refused(tmp_path, change):
    x, label = reference()
    path = tmp_path / "out.h5"
    store = open_store(path)
    store.write(np.arange(5), x=x[:5], label=label[:5])
    store.close()
    with pytest.raises(ReDiError, match="delete") as err:
        open_store(path, **change)
    assert "out.h5.partial" in str(err.value)
    # the refused partial is closed and untouched: the original settings still resume it
    store = open_store(path)
    assert int((~store.todo).sum()) == 5
    np.testing.assert_array_equal(store.file["x"][:5], x[:5])
    store.close()


def test_finish_with_missing_rows_raises_and_leaves_no_final_file(tmp_path):
    x, label = reference()
    path = tmp_path / "out.h5"
    store = open_store(path)
    rows = np.arange(0, N, 2)
    store.write(rows, x=x[rows], label=label[rows])
    with pytest.raises(ReDiError, match=f"{N - len(rows)} rows"):
        store.finish()
    assert not path.exists()
    assert (tmp_path / "out.h5.partial").exists()
    # resuming afterwards completes it
    store = open_store(path)
    rest = np.flatnonzero(store.todo)
    np.testing.assert_array_equal(rest, np.arange(1, N, 2))
    store.write(rest, x=x[rest], label=label[rest])
    store.finish()
    assert path.exists()


def test_finish_extra_stores_whole_file_datasets(tmp_path):
    x, label = reference()
    path = tmp_path / "out.h5"
    store = open_store(path)
    store.write(np.arange(N), x=x, label=label)
    scale = np.array([1.5, 2.5, 3.5])
    store.finish(component_std=scale, ratio=np.float64(0.25))
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["component_std"][:], scale)
        assert f["ratio"][()] == 0.25
        np.testing.assert_array_equal(f["x"][:], x)


def test_finish_extra_replaces_extra_of_an_earlier_failed_finish(tmp_path):
    x, label = reference()
    path = tmp_path / "out.h5"
    store = open_store(path)
    store.write(np.arange(N - 1), x=x[:-1], label=label[:-1])
    with pytest.raises(ReDiError):
        store.finish(stats=np.zeros(4))
    store = open_store(path)
    store.write(np.array([N - 1]), x=x[-1:], label=label[-1:])
    store.finish(stats=np.arange(3.0))
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["stats"][:], np.arange(3.0))


def test_partial_made_by_other_code_is_started_over(tmp_path, capsys):
    x, label = reference()
    store = open_store(tmp_path / "out.h5", code="code-a")
    store.write(np.arange(5), x=x[:5], label=label[:5])
    store.close()
    store = open_store(tmp_path / "out.h5", code="code-b")
    assert "written by code code-a, this is code-b; removed, starting over" in capsys.readouterr().err
    assert store.todo.all()  # no row of the other code's file is kept
    store.write(np.arange(N), x=x, label=label)
    store.finish()
    with h5py.File(tmp_path / "out.h5") as f:
        assert f.attrs["code_version"] == "code-b"
        np.testing.assert_array_equal(f["x"][:], x)
