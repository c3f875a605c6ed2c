"""Code versions: found from imports, blind to comments/docstrings/formatting, moved by real edits."""

import re
import shutil
import textwrap
from pathlib import Path

import pytest

import redi
from redi.code_version import PLUMBING, code_version, normalised_tree, stage_code_version, stage_modules
from redi.stages import STAGES, runner_module

PACKAGE = Path(redi.__file__).parent


@pytest.fixture
def package(tmp_path):
    """A copy of the redi package: edits happen there, never in the checkout."""
    root = tmp_path / "redi"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_train_modules_come_from_its_imports():
    modules = stage_modules("redi.train")
    # transitively: redi.train -> redi.models -> redi.models.dit -> redi.models.blocks
    for needed in ("redi.train", "redi.models", "redi.models.dit", "redi.models.blocks",
                   "redi.diffusion.objective", "redi.data.training_data"):
        assert needed in modules
    assert not PLUMBING & set(modules)
    assert "redi.sample" not in modules and "redi.metrics.evaluate" not in modules


def test_sample_covers_what_the_old_list_missed():
    # redi.sample imports runs, the checkpoint helpers and the samplers; the hand-kept list had only some
    modules = stage_modules("redi.sample")
    needed = {"redi.runs", "redi.checkpoints", "redi.samplers", "redi.guidance", "redi.encoders.vae"}
    assert needed <= set(modules)


def test_no_stage_imports_another_stage():
    """Shared code lives in its own modules (checkpoints, devices, models, pca, metrics.features), so
    editing one stage's runner never reruns another stage."""
    runners = {runner_module(stage) for stage in STAGES}
    assert {"redi.train", "redi.sample", "redi.report", "redi.fit_pca", "redi.metrics.convert"} <= runners
    for runner in runners:
        assert not (set(stage_modules(runner)) - {runner}) & runners, runner


def test_relative_package_and_function_level_imports(tmp_path):
    root = tmp_path / "redi"
    (root / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "runner.py": "from . import helper\nfrom .sub import thing\n\ndef f():\n    import redi.late\n",
        "helper.py": "from .sub.deep import x\n",
        "late.py": "",
        "unused.py": "",
        "cli.py": "from .unused import y\n",  # plumbing: neither hashed nor followed
        "sub/__init__.py": "thing = 1\n",
        "sub/deep.py": "from ..cli import z\nx = 2\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    assert stage_modules("redi.runner", root) == [
        "redi.helper", "redi.late", "redi.runner", "redi.sub", "redi.sub.deep"]


@pytest.mark.parametrize("old, new", [
    ("import torch\n", "import torch  # a new comment\n"),  # comment
    ('"""The transformer block', '"""Reworded: the transformer block'),  # module docstring
    ("\nimport torch\n", "\n\n\nimport torch\n"),  # blank lines
])
def test_cosmetic_edits_keep_the_version(package, old, new):
    before = stage_code_version("train", package)
    _edit(package / "models" / "blocks.py", old, new)
    assert stage_code_version("train", package) == before


def test_function_docstring_and_reformatting_keep_the_version(package):
    path = package / "models" / "blocks.py"
    before = stage_code_version("train", package)
    tree = normalised_tree(path.read_text())
    # a docstring added to every one-line `def` without one, and every existing one reworded
    lines, added = path.read_text().splitlines(), 0
    out = []
    for k, line in enumerate(lines):
        opens = k and re.match(r" *(def|class) .*:$", lines[k - 1]) and line.strip().startswith('"""')
        out.append(line.replace('"""', '"""Reworded. ', 1) if opens else line)
        match = re.match(r"( *)def .*:$", line)
        if match and not lines[k + 1].strip().startswith('"""'):
            out.append(f'{match.group(1)}    """Added docstring."""')
            added += 1
    assert added >= 2
    path.write_text("\n".join(out) + "\n")
    assert normalised_tree(path.read_text()) == tree
    assert stage_code_version("train", package) == before
    formatted = textwrap.dedent("""\
        def f(a,b):
            return (a+
                    b)
        """)
    assert normalised_tree(formatted) == normalised_tree("def f(a, b):\n    return a + b\n")


def test_a_semantic_edit_changes_train_and_sample_only(package):
    before = {s: stage_code_version(s, package) for s in ("train", "sample", "encode-latents", "evaluate")}
    _edit(package / "models" / "blocks.py", "import torch\n", "import torch\n\nSCALE = 2.0\n")
    after = {s: stage_code_version(s, package) for s in before}
    assert after["train"] != before["train"] and after["sample"] != before["sample"]
    assert after["encode-latents"] == before["encode-latents"] and after["evaluate"] == before["evaluate"]


def test_plumbing_edits_keep_every_version(package):
    before = stage_code_version("train", package)
    _edit(package / "io.py", "import hashlib\n", "import hashlib\n\nUNUSED = 1\n")
    assert stage_code_version("train", package) == before


def test_the_version_is_the_checkouts():
    assert code_version("redi.train") == stage_code_version("train")
    assert len(stage_code_version("train")) == 12
