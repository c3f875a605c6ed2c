"""The config schema: validation with readable errors, defaults, and CLI flags per config key."""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from jsonschema import validators

from .errors import ConfigError

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")
BASELINE_PATH = Path(__file__).with_name("config.baseline.yaml")
_JSON_TYPES = {
    "integer": "an integer", "number": "a number", "string": "a string",
    "boolean": "true or false", "array": "a list", "object": "a mapping", "null": "null",
}


@cache
def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _with_defaults(cls):
    """A validator class that fills each missing property with its schema default first."""
    check_properties = cls.VALIDATORS["properties"]

    def properties(validator, props, instance, schema):
        if isinstance(instance, dict):
            for key, sub in props.items():
                if "default" not in sub:
                    continue
                default = sub["default"]
                if key not in instance:
                    instance[key] = copy.deepcopy(default)
                elif isinstance(instance[key], dict) and isinstance(default, dict):
                    # a partly given block (e.g. encoder: {weights: X}) takes its required keys
                    # from the block's default; optional ones keep their own defaults
                    for required in _resolve(sub).get("required", []):
                        if required not in instance[key] and required in default:
                            instance[key][required] = copy.deepcopy(default[required])
        yield from check_properties(validator, props, instance, schema)

    return validators.extend(cls, {"properties": properties})


_Validator = _with_defaults(jsonschema.Draft7Validator)


def _describe(error: jsonschema.ValidationError) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    got = f"{error.instance!r} ({type(error.instance).__name__})"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        prefix = "" if key == "(top level)" else key + "."
        return (f"unknown key {', '.join(prefix + str(u) for u in unknown)}; "
                f"allowed here: {', '.join(allowed)}")
    if error.validator == "type":
        types = error.validator_value
        types = [types] if isinstance(types, str) else types
        return f"{key}: expected {' or '.join(_JSON_TYPES.get(t, t) for t in types)}, got {got}"
    if error.validator == "enum":
        return f"{key}: expected one of {error.validator_value}, got {got}"
    if error.validator == "required":
        return f"{key}: {error.message}"
    return f"{key}: {error.message}"


def validate_config(config: dict, source: str = "config", cross_checks: bool = True) -> dict:
    """Return a copy of `config` with defaults filled; raise ConfigError naming each bad key.

    `cross_checks`: also refuse settings of different stages that cannot work together (see
    cross_stage_errors); off where the other stages' keys are only schema defaults.
    """
    config = copy.deepcopy(config) if config is not None else {}
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(config).__name__}")
    errors = sorted(_Validator(load_schema()).iter_errors(config), key=lambda e: list(e.path))
    if errors:
        lines = "\n  ".join(_describe(e) for e in errors)
        raise ConfigError(f"invalid {source}:\n  {lines}")
    problems = value_errors(config) + (cross_stage_errors(config) if cross_checks else [])
    if problems:
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(problems))
    return config


# Patch-token width of the feature encoders whose architecture the name fixes.
FEATURE_DIMS = {"dinov2-vitb14-reg4": 768}
FLOAT32_MAX = 3.4028234663852886e38


def cross_stage_errors(config: dict) -> list[str]:
    """Settings that pass the schema but would fail a later stage after earlier ones ran."""
    problems = []
    train, pca = config["train"], config["pca"]
    if train["rank"] > pca["rank_max"]:
        problems.append(f"train.rank = {train['rank']} exceeds pca.rank_max = {pca['rank_max']}, the PCA "
                        f"channels project-features stores: lower train.rank or raise pca.rank_max")
    encoder = config["features"]["encoder"]
    dim = FEATURE_DIMS.get(encoder["name"])
    if encoder["name"] == "standin-vit" and not encoder["weights"]:
        dim, where = config["standins"]["vit_dim"], "standins.vit_dim"
    else:
        where = f"the {encoder['name']} features"
    if dim is not None and pca["rank_max"] > dim:
        problems.append(f"pca.rank_max = {pca['rank_max']} exceeds the feature dimension {dim} "
                        f"({where}): lower pca.rank_max")
    if config["dataset"]["root"] is None:  # the demo digits: their count is known now
        images = 10 * config["demo_data"]["per_class"]
        if train["batch_size"] > images:
            problems.append(f"train.batch_size = {train['batch_size']} exceeds the {images} images of "
                            f"demo_data.per_class = {config['demo_data']['per_class']} x 10 classes: "
                            f"lower train.batch_size or raise demo_data.per_class")
    return problems


def value_errors(config: dict) -> list[str]:
    """Values the schema's types allow but the code cannot use."""
    lr = config["train"]["lr"]
    if lr < FLOAT32_MAX:
        return []
    return [f"train.lr = {lr:g} does not fit in float32 (at most {FLOAT32_MAX:.3g}), the precision of the "
            f"optimizer's update: use a learning rate below 1"]


def load_config(path: str | Path) -> dict:
    """Read a YAML config file and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return validate_config(raw or {}, source=str(path))


# --- the config as result versions hash it -----------------------------------------------------

@cache
def load_baseline() -> dict[str, Any]:
    """Each key's baseline: the value that reproduces what the workflow did before the key existed."""
    return yaml.safe_load(BASELINE_PATH.read_text())


def schema_defaults() -> dict[str, Any]:
    """Every config key's current default, by dotted name (dataset.name, which has none, left out)."""
    defaults = validate_config({"dataset": {"name": "NAME"}})
    out = {}
    for section, node in load_schema()["properties"].items():
        for path, _ in _leaves(node):
            value: Any = defaults[section]
            for part in path:
                value = value.get(part) if isinstance(value, dict) else None
            out[".".join((section, *path))] = value
    del out["dataset.name"]
    return out


def identity(values: dict, prefix: str = "") -> dict:
    """`values` (sections of a config) less the keys at their baseline value: what versions hash.

    So a release that adds a key whose default reproduces the old behaviour (baseline = default)
    keeps every existing version, while a changed default (baseline stays) gives a new one.
    """
    baseline = load_baseline()
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if name in baseline:
            if value != baseline[name]:
                out[key] = value
        elif isinstance(value, dict):
            out[key] = identity(value, f"{name}.")
        else:
            out[key] = value
    return out


# --- CLI flags generated from the schema: one flag per config key -------------------------------

def _resolve(node: dict) -> dict:
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        return {**load_schema()["definitions"][name], **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _leaves(node: dict, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict]]:
    node = _resolve(node)
    if node.get("type") == "object" and "properties" in node:
        return [leaf for key, sub in node["properties"].items() for leaf in _leaves(sub, (*prefix, key))]
    return [(prefix, node)]


def flag_name(path: tuple[str, ...]) -> str:
    """The CLI flag of a config key below its section: ('encoder', 'name') -> --encoder-name."""
    return "--" + "-".join(path).replace("_", "-")


def _none_or(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _boolean(text: str) -> bool:
    value = text.lower()
    if value not in ("true", "false", "yes", "no", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true, false or none, got {text!r}")
    return value in ("true", "yes", "1")


def add_config_flags(parser: argparse.ArgumentParser, keys: Mapping[str, Sequence[str] | None]) -> None:
    """Add one flag per key of the given sections (None = whole section); defaults are the schema's."""
    schema = load_schema()["properties"]
    group = parser.add_argument_group("config keys (defaults: --configfile, else the schema)")
    for section, names in keys.items():
        for path, node in _leaves(schema[section]):
            if names is not None and path[0] not in names:
                continue
            types = node.get("type")
            types = [types] if isinstance(types, str) else (types or [])
            kwargs: dict[str, Any] = {"dest": ".".join((section, *path)), "default": argparse.SUPPRESS,
                                      "metavar": path[-1].upper(),
                                      "help": f"{node.get('description', '')} [{section}.{'.'.join(path)}]"}
            if "boolean" in types and "null" in types:  # --key, --no-key, or --key none
                kwargs.update(nargs="?", const=True, type=_none_or(_boolean), metavar="none")
                group.add_argument(flag_name(path), **kwargs)
                group.add_argument(f"--no-{flag_name(path)[2:]}", dest=kwargs["dest"], action="store_false",
                                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)
                continue
            if "boolean" in types:
                kwargs["action"] = argparse.BooleanOptionalAction
                del kwargs["metavar"]
            elif "array" in types:
                item = {"integer": int, "number": float}.get(node["items"].get("type"), str)
                kwargs.update(nargs="*", type=item)
            elif "enum" in node:
                kwargs.update(choices=node["enum"], type=type(node["enum"][0]))
                del kwargs["metavar"]
            else:
                kind = {"integer": int, "number": float}.get(types[0] if types else "string", str)
                kwargs["type"] = _none_or(kind) if "null" in types else kind
            group.add_argument(flag_name(path), **kwargs)


def config_from_args(args: argparse.Namespace, sections: list[str]) -> dict:
    """The validated config: schema defaults, then --configfile, then the flags given."""
    config = load_config(args.configfile) if getattr(args, "configfile", None) else {}
    config.setdefault("dataset", {"name": "cli"})
    for dest, value in vars(args).items():
        if "." in dest and dest.split(".", 1)[0] in sections:
            node = config
            *parents, leaf = dest.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    # other stages' keys are schema defaults unless a config file gives them
    given = bool(getattr(args, "configfile", None))
    return validate_config(config, source="command line", cross_checks=given)


def config_flags(sections: dict[str, dict]) -> list[str]:
    """The command-line arguments that give a stage these config values: config_from_args inverted.

    `sections` is {section: {key: value}} (a stage's slice of a config); nested keys flatten as in
    flag_name, booleans become --key / --no-key, None becomes `none`, lists one value per argument.
    Sorted, so the order of keys in a YAML file never changes a command line.
    """
    return [arg for _, values in sorted(sections.items()) for arg in _flags(values)]


def _flags(values: dict, prefix: tuple[str, ...] = ()) -> list[str]:
    out: list[str] = []
    for key, value in sorted(values.items()):
        path = (*prefix, key)
        if isinstance(value, dict):
            out += _flags(value, path)
        elif isinstance(value, bool):
            out.append(flag_name(path) if value else f"--no-{flag_name(path)[2:]}")
        elif isinstance(value, list):
            out += [flag_name(path), *(str(v) for v in value)]
        else:
            out += [flag_name(path), "none" if value is None else str(value)]
    return out


def key_table(
    stage_keys: Mapping[str, Mapping[str, Sequence[str] | None]],
    resource_keys: Mapping[str, frozenset[str] | set[str]],
    readers_of: dict[str, str],
) -> str:
    """A Markdown table of every config key: type, default, meaning and the stages it reruns.

    `readers_of` gives the entry for keys no stage reads as a flag (paths, device, dataset root).
    """
    defaults = validate_config({"dataset": {"name": "NAME"}})
    rows = ["| key | type | default | read by (reruns on change) | meaning |",
            "| --- | --- | --- | --- | --- |"]
    for section, node in load_schema()["properties"].items():
        for path, leaf in _leaves(node):
            value: Any = defaults[section]
            for part in path:
                value = value.get(part) if isinstance(value, dict) else None
            key = ".".join((section, *path))
            readers = ", ".join(stage for stage, keys in stage_keys.items() if section in keys
                                and (keys[section] is None or (path and path[0] in keys[section])))
            if path and path[-1] in resource_keys.get(section, ()):
                readers = f"{readers} (speed only: reruns nothing)"
            kind = leaf.get("type", "")
            kind = " or ".join(kind) if isinstance(kind, list) else kind
            if "enum" in leaf:
                kind = " / ".join(f"`{v}`" for v in leaf["enum"])
            text = " ".join(leaf.get("description", "").split())
            rows.append(f"| `{key}` | {kind} | `{json.dumps(value)}` | "
                        f"{readers_of.get(key, readers)} | {text} |")
    return "\n".join(rows)
