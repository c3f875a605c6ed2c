"""The run grid: `runs:` names combinations of training and sampling settings (an ablation).

Each run deep-merges its `train` / `sample` overrides onto the config's own sections; every
merged config is validated like the whole file, and errors name the run. A run with
`train_run: <other>` samples the other run's model (e.g. its Representation Guidance or CFG
variant) instead of training its own. `fid_steps: [N, ...]` adds a run `<name>-step<N>` per step
that samples the EMA snapshot of that training step (the report's FID-vs-step points). Without
`runs:` the config's train and sample sections form one run, "main".

A run's `seeds: {train: [0, 1], sample: [0, 1, 2]}` makes the seeds grid axes: the run expands
into one run per (train seed, sample seed), named `<name>@t<T>s<S>` (`@` is not allowed in a
declared name, so an expansion never collides with one), with train.seed / sample.seed set; the
sample seeds of one train seed share its training. Every run records its `group` (the declared
name; `<name>-step<N>` for fid_steps points) and its `seeds`, which the report aggregates over. A
train_run variant of a seeded run samples each of its training seeds (with its own seeds.sample,
else the source's).
"""

from __future__ import annotations

import copy

from .config import validate_config
from .errors import ConfigError

DEFAULT_RUN = "main"
# the samplers each objective supports (the first is the paper's, sample.sampler: auto). Kept here, not in
# samplers.py: the workflow checks runs while it plans, and importing torch there costs seconds per call.
SAMPLERS = {"interpolant": ("sde", "ode-euler", "ode-heun"), "ddpm": ("ddpm", "ddim")}
RUN_SECTIONS = ("train", "sample")


def deep_merge(base: dict, override: dict) -> dict:
    """A copy of base with override's keys replaced, recursing into nested mappings."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def seeded_name(group: str, train_seed: int, sample_seed: int) -> str:
    """The name of one (train seed, sample seed) member of a seeded run."""
    return f"{group}@t{train_seed}s{sample_seed}"


def _seeds(name: str, spec: dict, key: str) -> list[int] | None:
    """A run's seeds[key]; None when it gives none."""
    values = (spec.get("seeds") or {}).get(key)
    if values is not None and len(set(values)) != len(values):
        raise ConfigError(f"run '{name}': seeds.{key} {values} repeats a seed")
    return None if values is None else list(values)


def expand_seeds(config: dict, runs: dict[str, dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(the run specs with seeded runs expanded, {name: {"group", "seeds", "seeded"}}).

    A run without seeds stays one run under its declared name.
    """
    specs, meta = {}, {}
    trainers = {}  # (declared run, train seed or None) -> the expanded run that trains it
    for name in sorted(runs, key=lambda n: runs[n].get("train_run") is not None):  # sources first
        spec, source = runs[name], runs[name].get("train_run")
        variant = source is not None and source in runs
        owner = runs[source] if variant else spec
        train, sample = (deep_merge(config.get(section, {}), (owner if section == "train" else spec)
                                    .get(section) or {}) for section in RUN_SECTIONS)
        train_seeds, sample_seeds = _seeds(name, spec, "train"), _seeds(name, spec, "sample")
        for section, seeds in (("train", train_seeds), ("sample", sample_seeds)):
            if seeds is not None and "seed" in (spec.get(section) or {}):
                raise ConfigError(f"run '{name}' sets {section}.seed and seeds.{section}; give one of them")
        if variant:
            if (spec.get("seeds") or {}).get("train") is not None:
                raise ConfigError(f"run '{name}' has train_run and seeds.train; its training seeds are "
                                  f"run '{source}''s")
            members = [m for m in meta.values() if m["group"] == source and m["seeded"]]
            train_seeds = list(dict.fromkeys(m["seeds"]["train"] for m in members)) or None
            if members and (spec.get("seeds") or {}).get("sample") is None:
                sample_seeds = list(dict.fromkeys(m["seeds"]["sample"] for m in members))
        if train_seeds is None and sample_seeds is None:
            specs[name] = spec
            meta[name] = {"group": name, "seeded": False,
                          "seeds": {"train": train.get("seed", 0), "sample": sample.get("seed", 0)}}
            trainers[(name, None)] = name
            continue
        for t in train_seeds or [None]:
            t_seed = train.get("seed", 0) if t is None else t
            for s in sample_seeds or [sample.get("seed", 0)]:
                member = seeded_name(name, t_seed, s)
                out = {k: v for k, v in spec.items() if k not in ("seeds", "train")}
                out["sample"] = deep_merge(spec.get("sample") or {}, {"seed": s})
                if variant:
                    out["train_run"] = trainers.get((source, t), source)
                    if "train" in spec:
                        out["train"] = spec["train"]  # refused below, naming the run
                elif (name, t) in trainers:
                    out["train_run"] = trainers[(name, t)]
                else:
                    out["train"] = deep_merge(spec.get("train") or {}, {} if t is None else {"seed": t})
                    trainers[(name, t)] = member
                specs[member] = out
                meta[member] = {"group": name, "seeded": True, "seeds": {"train": t_seed, "sample": s}}
    order = {name: k for k, name in enumerate(runs)}  # back to declaration order
    names = sorted(specs, key=lambda n: order[meta[n]["group"]])
    return {n: specs[n] for n in names}, {n: meta[n] for n in names}


def expand_runs(config: dict) -> dict[str, dict]:
    """run name -> the full config of that run (validated, defaults filled), in declaration order."""
    declared = {name: spec or {} for name, spec in (config.get("runs") or {DEFAULT_RUN: {}}).items()}
    runs, meta = expand_seeds(config, declared)
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
        full["group"], full["seeds"] = meta[name]["group"], dict(meta[name]["seeds"])
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
            group = f"{run['group']}-step{step}"
            seeded = name != run["group"]
            point = seeded_name(group, run["seeds"]["train"], run["seeds"]["sample"]) if seeded else group
            if point in out:
                raise ConfigError(f"run '{name}': fid_steps adds a run '{point}', a name already in runs")
            out[point] = copy.deepcopy(run) | {"tables": [], "label": f"{run['label']} @ {step}",
                                               "group": group}
            out[point]["sample"]["train_step"] = step
    for run in out.values():  # every run reading a training knows all the snapshots it keeps
        wanted = {r["sample"]["train_step"] for r in out.values()
                  if r["train_run"] == run["train_run"] and r["sample"]["train_step"]}
        run["train"]["snapshot_steps"] = sorted(wanted | set(run["train"]["snapshot_steps"]))
    return out
