"""The GPU check's CPU-side guards: its static import preflight against the device's package set plus
the wheels gpu_wheels.sh fetches, and the carry-over-balanced variant order of the benchmarks."""

from __future__ import annotations

import collections
import re
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_preflight  # noqa: E402
from interleave import balanced_cycle, round_order  # noqa: E402

PACKAGES = gpu_preflight.read_packages(REPO / "benchmarks" / "device_packages.txt")


def listed_wheels() -> list[tuple[str, str]]:
    """(name, version) of each wheel benchmarks/gpu_wheels.sh downloads."""
    text = (REPO / "benchmarks" / "gpu_wheels.sh").read_text()
    return re.findall(r"^\s+([A-Za-z0-9_.-]+)==([\w.]+)", text, flags=re.M)


def fake_wheelhouse(folder: Path, skip: str | None = None) -> Path:
    """One tiny wheel per listed name, holding its top-level package (what the preflight reads)."""
    folder.mkdir()
    for name, version in listed_wheels():
        if name == skip:
            continue
        with zipfile.ZipFile(folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as z:
            for top in gpu_preflight.import_names(name):
                z.writestr(f"{top}/__init__.py", "")
            z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", f"Name: {name}\n")
    return folder


def run(packages, wheels: Path):
    script = REPO / "benchmarks" / "gpu_check.sh"
    return gpu_preflight.preflight(script, packages, sorted(wheels.glob("*.whl")))


def test_preflight_passes_with_the_device_packages_and_the_listed_wheels(tmp_path):
    problems, summary = run(PACKAGES, fake_wheelhouse(tmp_path / "whl"))
    assert problems == []
    assert {"redi train", "tests/test_gpu.py", "benchmarks/train_throughput.py"} <= set(summary["roots"])
    assert summary["third_party"]["jsonschema"].startswith("wheel:")
    assert summary["third_party"]["torch"] == "device: torch"


@pytest.mark.parametrize("removed,module", [("h5py", "h5py"), ("pyyaml", "yaml"), ("pytest", "pytest")])
def test_preflight_names_a_module_missing_from_the_device(tmp_path, removed, module):
    packages = [p for p in PACKAGES if p != removed]
    problems, _ = run(packages, fake_wheelhouse(tmp_path / "whl"))
    assert len(problems) == 1 and problems[0].startswith(f"missing module {module!r} (imported at ")


def test_preflight_names_a_missing_wheel(tmp_path):
    problems, _ = run(PACKAGES, fake_wheelhouse(tmp_path / "whl", skip="jsonschema"))
    assert [p.split(" (")[0] for p in problems] == ["missing module 'jsonschema'"]


def test_preflight_rejects_wheels_the_device_cannot_install(tmp_path):
    wheels = fake_wheelhouse(tmp_path / "whl")
    (wheels / "rpds_py-0.30.0-cp311-cp311-manylinux_2_17_x86_64.whl").write_bytes(
        (wheels / "rpds_py-0.30.0-py3-none-any.whl").read_bytes())
    problems, _ = run(PACKAGES, wheels)
    assert any("cp311" in p and "CPython 3.12" in p for p in problems)
    assert any("two versions of rpds-py" in p for p in problems)


def test_preflight_skips_only_declared_lazy_imports(tmp_path):
    # diffusers is imported inside load_vae (and under TYPE_CHECKING), on a path the check never runs
    problems, _ = run(PACKAGES, fake_wheelhouse(tmp_path / "whl"))
    assert not any("diffusers" in p for p in problems)
    assert [top for m, _, top in gpu_preflight.imports_of(REPO / "redi" / "encoders" / "vae.py")
            if m == "diffusers"] == [False]
    # the same module imported at module level, or inside a try/except ImportError, is told apart
    source = tmp_path / "m.py"
    source.write_text("import diffusers\ntry:\n    import cv2\nexcept ImportError:\n    pass\n"
                      "def f():\n    import webdataset\n")
    assert gpu_preflight.imports_of(source) == [("diffusers", 1, True), ("webdataset", 7, False)]


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_each_variant_follows_every_other_equally_often(k):
    cycle = balanced_cycle(k)
    assert all(sorted(r) == list(range(k)) for r in cycle)  # each round runs each variant once
    sequence = [v for rnd in range(3 * len(cycle)) for v in round_order(k, rnd)]
    pairs = collections.Counter(zip(sequence, sequence[1:] + sequence[:1], strict=True))
    assert set(pairs) == {(a, b) for a in range(k) for b in range(k) if a != b}
    assert len(set(pairs.values())) == 1


def test_the_old_rotation_was_unbalanced():
    # baseline (0) followed separate (2) in 2 of 3 rounds under "rotate the start each round"
    rounds = [[(s + i) % 3 for i in range(3)] for s in range(3)]
    sequence = [v for r in rounds for v in r]
    pairs = collections.Counter(zip(sequence, sequence[1:] + sequence[:1], strict=True))
    assert (pairs[(2, 0)], pairs[(0, 2)]) == (2, 1)
