"""The run grid: `runs:` names combinations of training and sampling settings (an ablation).

Each run deep-merges its `train` / `sample` overrides onto the config's own sections; every
merged config is validated like the whole file, and errors name the run. A run with
`train_run: <other>` samples the other run's model (e.g. its Representation Guidance or CFG
variant) instead of training its own. `fid_steps: [N, ...]` adds a run `<name>-step<N>` per step
that samples the EMA snapshot of that training step (the report's FID-vs-step points). Without
`runs:` the config's train and sample sections form one run, "main".
"""

from __future__ import annotations

import copy

from .config import validate_config
from .errors import ConfigError

DEFAULT_RUN = "main"
# the samplers each objective supports (the first is the paper's, sample.sampler: auto)
SAMPLERS = {"interpolant": ("sde", "ode-euler", "ode-heun"), "ddpm": ("ddpm", "ddim")}
RUN_SECTIONS = ("train", "sample")


def deep_merge(base: dict, override: dict) -> dict:
    """A copy of base with override's keys replaced, recursing into nested mappings."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def expand_runs(config: dict) -> dict[str, dict]:
    """run name -> the full config of that run (validated, defaults filled), in declaration order."""
    runs = {name: spec or {} for name, spec in (config.get("runs") or {DEFAULT_RUN: {}}).items()}
    expanded = {}
    for name, spec in runs.items():
        source = spec.get("train_run")
        if source is not None:
            if source not in runs or runs[source].get("train_run") or source == name:
                raise ConfigError(f"run '{name}': train_run '{source}' must name another run that trains "
                                  f"itself")
            if "train" in spec:
                raise ConfigError(f"run '{name}' has train_run and train overrides; put them in run "
                                  f"'{source}'")
        merged = {k: v for k, v in config.items() if k != "runs"}
        for section in RUN_SECTIONS:
            owner = runs[source] if section == "train" and source is not None else spec
            merged[section] = deep_merge(config.get(section, {}), owner.get(section, {}))
        try:
            full = validate_config(merged, source=f"run '{name}'")
        except ConfigError as err:
            raise ConfigError(str(err).replace("invalid run", "invalid settings of run", 1)) from None
        sampler, objective = full["sample"]["sampler"], full["train"]["objective"]
        if sampler != "auto" and sampler not in SAMPLERS[objective] and not full["sample"]["checkpoint"]:
            raise ConfigError(f"run '{name}': sample.sampler {sampler} does not fit train.objective "
                              f"{objective} (choose auto or one of {', '.join(SAMPLERS[objective])})")
        tables = spec.get("table", "runs")
        full["tables"] = [tables] if isinstance(tables, str) else list(tables)
        full["label"] = spec.get("label", name)
        full["train_run"] = source or name
        full["curve"] = name  # the FID-vs-step line this run's point belongs to
        expanded[name] = full
    return add_step_runs(expanded, {name: spec.get("fid_steps", []) for name, spec in runs.items()})


def add_step_runs(expanded: dict[str, dict], fid_steps: dict[str, list[int]]) -> dict[str, dict]:
    """The `<name>-step<N>` runs of every run's fid_steps, and the snapshot steps their trainings keep."""
    out = dict(expanded)
    for name, steps in fid_steps.items():
        if not steps:
            continue
        run = expanded[name]
        final = run["train"]["steps"]
        if run["sample"]["checkpoint"] or run["sample"]["train_step"]:
            raise ConfigError(f"run '{name}': fid_steps needs a run that samples its final weights")
        bad = [s for s in steps if not 0 < s < final]
        if bad:
            raise ConfigError(f"run '{name}': fid_steps {bad} must lie between 0 and train.steps {final}")
        for step in sorted(set(steps)):
            point = f"{name}-step{step}"
            if point in out:
                raise ConfigError(f"run '{name}': fid_steps adds a run '{point}', a name already in runs")
            out[point] = copy.deepcopy(run) | {"tables": [], "label": f"{run['label']} @ {step}"}
            out[point]["sample"]["train_step"] = step
    for run in out.values():  # every run reading a training knows all the snapshots it keeps
        wanted = {r["sample"]["train_step"] for r in out.values()
                  if r["train_run"] == run["train_run"] and r["sample"]["train_step"]}
        run["train"]["snapshot_steps"] = sorted(wanted | set(run["train"]["snapshot_steps"]))
    return out
