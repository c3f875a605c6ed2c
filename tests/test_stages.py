"""The stage registry (redi/stages.py): the workflow's DAG agrees with it, config -> flags -> config
is exact for every key a stage reads, every manifest names its stage as the registry does, and a new
stage needs only a registry entry, its runner and its rule."""

import ast
import importlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_reruns import copy_repo, snakemake

from redi.cli import build_parser
from redi.config import _leaves, config_flags, config_from_args, load_schema, schema_defaults, validate_config
from redi.runs import expand_runs
from redi.stages import STAGES, Plan, stage_config

REPO = Path(__file__).resolve().parents[1]


# --- the registry itself -------------------------------------------------------------------------------

def test_every_runner_is_a_function_of_its_module():
    for stage in STAGES.values():
        module, function = stage.runner.split(":")
        assert callable(getattr(importlib.import_module(module), function)), stage.name


def test_speed_keys_are_keys_the_stage_reads():
    schema = load_schema()["properties"]
    for stage in STAGES.values():
        for section, keys in stage.speed.items():
            read = stage.keys[section]
            names = {path[0] for path, _ in _leaves(schema[section])} if read is None else set(read)
            assert keys <= names, f"{stage.name}: speed keys {keys - names} of {section} are not read"


def test_every_manifest_names_its_stage_as_the_registry_does():
    written = {}
    for path in (REPO / "redi").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "write_manifest":
                stage = node.args[1]
                assert isinstance(stage, ast.Constant), f"{path}:{node.lineno}: stage name is not a literal"
                written[stage.value] = path
    assert set(written) <= set(STAGES), written  # the registry's spelling
    # every stage with a result folder writes one, but evaluate (its metrics JSON sits in the samples)
    assert {name for name, stage in STAGES.items() if stage.folder} - set(written) == {"evaluate"}


# --- config -> flags -> config, for every key of every stage ------------------------------------------

def _candidates(key: str, node: dict, default):
    """Values the schema allows for a key, other than its default (validated by the caller)."""
    types = node.get("type", [])
    types = [types] if isinstance(types, str) else types
    values: list = []
    if "enum" in node:
        values += node["enum"]
    if "boolean" in types:
        values += [True, False]
    if "integer" in types:
        low = node.get("minimum", 0)
        values += [(default if isinstance(default, int) else low) + 1, low, low + 3]
    if "number" in types:
        values += [0.5 * (default or 0.3) + 0.123, 0.3, 1.75e-7]
    if "string" in types:
        values += ["SiT-XL/2", "DiT-B/4"] if "pattern" in node else ["my weights/model 1.pt", "hub/name"]
    if "array" in types:
        low = node["items"].get("minimum", 1)
        values += [[low + 1, low + 7, low + 2], [low, low + 5]]
    if "null" in types:
        values.append(None)
    return [v for v in values if v != default]


def _valid(key: str, value) -> bool:
    section, *path = key.split(".")
    config: dict = {"dataset": {"name": "t"}}
    node = config.setdefault(section, {})
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    try:
        validate_config(config, cross_checks=False)
    except Exception:
        return False
    return True


def _stage_key_values(stage: str) -> dict[str, list]:
    """{dotted key: the non-default values it may take} for every key the stage reads."""
    schema, defaults = load_schema()["properties"], schema_defaults()
    out = {}
    for section, names in STAGES[stage].keys.items():
        for path, node in _leaves(schema[section]):
            if names is None or path[0] in names:
                key = ".".join((section, *path))
                out[key] = [v for v in _candidates(key, node, defaults[key]) if _valid(key, v)]
                assert out[key], f"no non-default value found for {key}"
    return out


def _config(values: dict[str, object]) -> dict:
    config: dict = {"dataset": {"name": "t"}}
    for key, value in values.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return validate_config(config, cross_checks=False)


def _path_args(stage: str) -> list[str]:
    return [arg for path in STAGES[stage].paths if path.required for arg in (path.flag, "p")]


@pytest.mark.parametrize("stage", [name for name, stage in STAGES.items() if stage.keys])
def test_config_to_flags_to_config_is_exact_for_every_key(stage):
    choices = _stage_key_values(stage)
    for variant in range(max(len(v) for v in choices.values())):  # every non-default value at least once
        values = {key: options[variant % len(options)] for key, options in choices.items()}
        wanted = stage_config(_config(values), stage)
        argv = shlex.split(shlex.join(config_flags(wanted)))  # through a shell line, as the rules pass them
        args = build_parser().parse_args([stage, *_path_args(stage), *argv])
        back = stage_config(config_from_args(args, list(STAGES[stage].keys)), stage)
        assert back == wanted, f"variant {variant}: {argv}"


def test_the_round_trip_covers_every_schema_key_and_both_ways_of_each_boolean():
    read = {key for stage in STAGES for key in _stage_key_values(stage)}
    flags_free = {"results", "device", "launch", "resources", "runs", "dataset.name", "dataset.root",
                  "sample.checkpoint", "sample.train_step", "sample.checkpoint_source", "evaluate.reference",
                  "evaluate.reference_source", "pca.official"}  # passed as paths or not read by a stage
    for key in schema_defaults():
        assert key in read or any(key == k or key.startswith(k + ".") for k in flags_free), key
    booleans = {k: v for stage in STAGES for k, v in _stage_key_values(stage).items()
                if isinstance(schema_defaults()[k], bool)}
    assert booleans and all(len(v) == 1 for v in booleans.values())  # the default's opposite...
    # ...and the defaults themselves are the other way: a key at its default passes through as well
    defaults = _config({})
    for stage in STAGES:
        wanted = stage_config(defaults, stage)
        args = build_parser().parse_args([stage, *_path_args(stage), *config_flags(wanted)])
        assert stage_config(config_from_args(args, list(STAGES[stage].keys)), stage) == wanted


# --- the DAG Snakemake plans is the registry's -------------------------------------------------------

def _planned(output: str) -> list[dict]:
    """rule, inputs, outputs and wildcards of each job of a dry run."""
    jobs = []
    for rule, body in re.findall(r"\nrule (\w+):\n((?:    .*\n)+)", output):
        fields = dict(re.findall(r"^    (\w+): (.*)$", body, re.MULTILINE))
        jobs.append({"rule": rule,
                     "input": fields["input"].split(", ") if "input" in fields else [],
                     "output": fields.get("output", "").split(", "),
                     "wildcards": dict(w.split("=", 1) for w in fields.get("wildcards", "").split(", ")
                                       if w)})
    return jobs


def _location(path: str, base: str) -> tuple[str, str | None, str] | None:
    """(folder, run, version) of a result path; None for a file outside the results."""
    if not path.startswith(base + "/"):
        return None
    parts = path[len(base) + 1:].split("/")
    per_run = any(s.per_run and s.folder == parts[0] for s in STAGES.values())
    folder, run, version = (parts[0], parts[1], parts[2]) if per_run else (parts[0], None, parts[1])
    metrics = re.fullmatch(r"metrics-([0-9a-f]{8})\.json", parts[-1])
    return folder, run, metrics[1] if metrics else version  # evaluate's version names its file


# Files a stage reads that the config names (not results of another stage).
CONFIG_FILES = {"sample": ("sample", "checkpoint"), "reference-stats": ("evaluate", "reference"),
                "convert-pca": ("pca", "official")}


def _variants_config(workdir: Path) -> Path:
    """ci.yaml with the other branches of the upstream rules: official PCA file, ADM-style reference,
    an official checkpoint, an oracle run, a snapshot run, a VAE given by weights (no stand-in)."""
    config = yaml.safe_load((REPO / "config" / "ci.yaml").read_text())
    config["pca"]["official"] = "official_pca.pth"
    config["evaluate"].update(inception_weights=None, reference="ref.npz")
    config["latents"]["encoder"] = {"name": "sd-vae", "weights": "vae folder"}
    config["runs"] = {"redi": {"label": "r"}, "oracle": {"train_run": "redi", "sample": {"oracle": True}},
                      "official": {"sample": {"checkpoint": "ckpt.pt", "architecture": "SiT-XL/2"}},
                      "snapshot": {"train_run": "redi", "sample": {"train_step": 10}}}
    for name in ("official_pca.pth", "ref.npz", "ckpt.pt"):
        (workdir / name).touch()
    path = workdir / "variants.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("variant", ["ci", "variants"])
def test_rule_inputs_are_the_registrys_upstream_results(variant, tmp_path):
    configfile = REPO / "config" / "ci.yaml" if variant == "ci" else _variants_config(tmp_path)
    done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                           str(tmp_path), "--configfile", str(configfile), "-n"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    config = validate_config(yaml.safe_load(configfile.read_text()))
    plan = Plan(config, expand_runs(config))
    by_rule = {stage.rule: stage for stage in STAGES.values()}
    seen = set()
    for job in _planned(done.stdout):
        stage = by_rule.get(job["rule"])
        if stage is None or stage.folder is None:  # all, data, fetch: no result folder of their own
            continue
        run = job["wildcards"].get("run")
        seen.add((stage.name, run))
        assert _location(job["output"][0], plan.base) == (stage.folder, run, plan.version(stage.name, run))
        found = {_location(path, plan.base) for path in job["input"]} - {None}
        wanted = {(STAGES[up].folder, up_run, plan.version(up, up_run)) for up, up_run in
                  plan.inputs(stage.name, run)}
        assert found == wanted, f"{job['rule']} {run or ''}: inputs {found}, registry {wanted}"
        others = {path for path in job["input"] if _location(path, plan.base) is None}
        section, key = CONFIG_FILES.get(stage.name, (None, None))
        named = plan.run_config(run)[section][key] if section else None
        assert others == ({named} if named else set()), f"{job['rule']}: {others}"
    # and every job the registry's graph reaches from the report is planned, and nothing else
    reached, todo = set(), [("report", None)]
    while todo:
        node = todo.pop()
        if node not in reached:
            reached.add(node)
            todo += plan.inputs(*node)
    assert seen == reached


# --- a new stage: one registry entry, its runner, its rule ------------------------------------------------

TOY_ENTRY = '''    Stage("toy-count", "Count the demo digits (a toy stage).",
          (PathFlag("--images", "manifest.json of demo-data"), PathFlag("--out", "output folder")),
          "redi.toy_count:run_stage", "toy", keys={"pca": ("seed",)},
          upstream=lambda config, run: ["demo-data"]),
'''
TOY_RUNNER = '''"""A toy stage: records how many digits a demo-data manifest lists."""

from pathlib import Path

from .io import read_manifest, write_manifest


def run_stage(args, cfg):
    counts = read_manifest(args.images)["counts_per_class"]
    write_manifest(Path(args.out) / "manifest.json", "toy-count", cfg, digits=sum(counts.values()))
'''
TOY_RULE = '''rule toy_count:
    input:
        **upstream_manifests("toy-count"),
    output:
        manifest("toy-count"),
    params:
        out=output_dir,
        flags=cli_flags("toy-count"),
    shell:
        "redi toy-count --images {input.demo_data:q} --out {params.out:q} {params.flags}"
'''


def _toy_job(output: str) -> tuple[str, str, str]:
    """(toy version, its input's demo-data version, its shell line) of a dry run."""
    (job,) = [j for j in _planned(output) if j["rule"] == "toy_count"]
    (demo,) = [j for j in _planned(output) if j["rule"] == "demo_data"]
    version = re.fullmatch(r"results/ci-demo/toy/([0-9a-f]{8})/manifest.json", job["output"][0])[1]
    assert job["input"] == demo["output"]  # its input is demo-data's result, as the registry says
    return version, demo["output"][0].split("/")[3], re.search(r"redi toy-count .*", output)[0]


def test_a_toy_stage_is_one_registry_entry_its_runner_and_its_rule(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    registry = repo / "redi" / "stages.py"
    text = registry.read_text()
    assert text.count("\n]}\n") == 1
    registry.write_text(text.replace("\n]}\n", "\n" + TOY_ENTRY + "]}\n"))
    (repo / "redi" / "toy_count.py").write_text(TOY_RUNNER)
    (repo / "workflow" / "rules" / "toy.smk").write_text(TOY_RULE)
    env = {"PYTHONPATH": str(repo), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}

    # the CLI: `redi toy-count --help` lists its key, and a call runs the runner on its slice
    def redi(*argv):
        return subprocess.run([sys.executable, "-m", "redi.cli", *argv], capture_output=True, text=True,
                              env=env, cwd=repo, timeout=120)

    helped = redi("toy-count", "--help")
    assert helped.returncode == 0 and "--images" in helped.stdout and "--seed" in helped.stdout
    images = tmp_path / "images.json"
    images.write_text(json.dumps({"counts_per_class": {"0": 3, "1": 4}}))
    ran = redi("toy-count", "--images", str(images), "--out", str(tmp_path / "toy"), "--seed", "5")
    assert ran.returncode == 0, ran.stderr
    manifest = json.loads((tmp_path / "toy" / "manifest.json").read_text())
    assert manifest["stage"] == "toy-count" and manifest["digits"] == 7
    assert manifest["config"] == {"pca": {"seed": 5}}

    # the DAG and the versions: planned after demo-data; its key changes its version, others do not
    args = ["--configfile", "config/ci.yaml", "-n", "toy_count"]
    version, demo, shell = _toy_job(snakemake(repo, *args))
    assert shell.endswith("--seed 0")
    reseeded, same_demo, shell = _toy_job(snakemake(repo, *args, "--config", "pca={seed: 7}"))
    assert reseeded != version and same_demo == demo and shell.endswith("--seed 7")
    unrelated, _, _ = _toy_job(snakemake(repo, *args, "--config", "train={steps: 30}"))
    assert unrelated == version
