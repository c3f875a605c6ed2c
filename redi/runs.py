"""The run grid: `runs:` names combinations of training and sampling settings (an ablation).

Each run deep-merges its `train` / `sample` overrides onto the config's own sections; every
merged config is validated like the whole file, and errors name the run. A run with
`train_run: <other>` samples the other run's model (e.g. its Representation Guidance or CFG
variant) instead of training its own. Without `runs:` the config's train and sample sections
form one run, "main".
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
        expanded[name] = full
    return expanded
