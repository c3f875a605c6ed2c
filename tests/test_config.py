"""The config schema: defaults, readable errors, YAML loading and the generated CLI flags."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

from redi.config import (
    SCHEMA_PATH,
    add_config_flags,
    config_from_args,
    load_config,
    load_schema,
    validate_config,
)
from redi.errors import ConfigError, ReDiError

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {"dataset": {"name": "toy"}}


def raw_schema() -> dict:
    """The schema file read here, independently of redi.config's cached copy."""
    return yaml.safe_load(SCHEMA_PATH.read_text())


def config_error(config) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    return str(info.value)


# --- defaults --------------------------------------------------------------------------------------

def test_defaults_are_filled_for_missing_sections():
    config = validate_config(MINIMAL)
    assert config["pca"]["rank_max"] == 32
    assert config["pca"]["sample_images"] == 300000
    assert config["shard"] == {"image_size": 256, "shard_size": 1000, "workers": 2,
                               "max_pixels": 100_000_000, "max_aspect_ratio": 20}
    assert config["dataset"] == {"name": "toy", "root": None, "num_classes": 1000}
    assert config["latents"]["encoder"] == {"name": "sd-vae", "weights": "stabilityai/sd-vae-ft-ema"}
    assert config["features"]["encoder"] == {"name": "dinov2-vitb14-reg4", "weights": None}
    assert config["results"] == "results" and config["device"] == "auto"


def test_every_schema_default_is_filled():
    config = validate_config(MINIMAL)
    for section, node in raw_schema()["properties"].items():
        if "properties" not in node:
            assert config[section] == node["default"], section
            continue
        for key, sub in node["properties"].items():
            if "properties" in sub:  # a nested block (train.model): each of its keys has its default
                for inner, leaf in sub["properties"].items():
                    assert config[section][key][inner] == leaf["default"], f"{section}.{key}.{inner}"
            elif "default" in sub:
                assert config[section][key] == sub["default"], f"{section}.{key}"


def test_given_values_are_kept_and_input_is_not_mutated():
    given = {"dataset": {"name": "toy", "num_classes": 10}, "pca": {"rank_max": 8}}
    snapshot = copy.deepcopy(given)
    config = validate_config(given)
    assert given == snapshot
    assert config["pca"]["rank_max"] == 8 and config["pca"]["seed"] == 0
    assert config["dataset"]["num_classes"] == 10


def test_encoder_given_by_name_gets_the_definition_default_weights():
    config = validate_config({**MINIMAL, "latents": {"encoder": {"name": "standin-vae"}}})
    assert config["latents"]["encoder"] == {"name": "standin-vae", "weights": None}


def test_defaults_are_not_shared_between_calls():
    first = validate_config(MINIMAL)
    first["standins"]["vae_channels"].append(999)
    first["latents"]["encoder"]["name"] = "changed"
    second = validate_config(MINIMAL)
    default = load_schema()["properties"]["standins"]["properties"]["vae_channels"]["default"]
    assert second["standins"]["vae_channels"] == default and 999 not in default
    assert second["latents"]["encoder"]["name"] == "sd-vae"


# --- errors ----------------------------------------------------------------------------------------

def test_config_error_is_a_redi_error():
    assert issubclass(ConfigError, ReDiError)


def test_wrong_type_names_key_and_type():
    message = config_error({**MINIMAL, "pca": {"rank_max": "abc"}})
    assert "pca.rank_max" in message
    assert "integer" in message
    assert "'abc'" in message


def test_float_for_integer_is_rejected():
    message = config_error({**MINIMAL, "shard": {"image_size": 32.5}})
    assert "shard.image_size" in message and "integer" in message


def test_unknown_key_is_named():
    message = config_error({**MINIMAL, "pca": {"foo": 1}})
    assert "pca.foo" in message
    assert "rank_max" in message  # the allowed keys are listed


def test_unknown_top_level_key_is_named():
    message = config_error({**MINIMAL, "bogus_section": {}})
    assert "bogus_section" in message


def test_bad_enum_names_key_and_allowed_values():
    message = config_error({**MINIMAL, "latents": {"encoder": {"name": "vae-xl"}}})
    assert "latents.encoder.name" in message
    assert "vae-xl" in message
    for name in ("sd-vae", "standin-vae"):
        assert name in message


def test_feature_encoder_in_the_latent_section_is_rejected():
    message = config_error({**MINIMAL, "latents": {"encoder": {"name": "dinov2-vitb14-reg4"}}})
    assert "latents.encoder.name" in message and "sd-vae" in message
    message = config_error({**MINIMAL, "features": {"encoder": {"name": "sd-vae"}}})
    assert "features.encoder.name" in message and "dinov2-vitb14-reg4" in message


def test_bad_dtype_enum():
    message = config_error({**MINIMAL, "features": {"dtype": "bfloat16"}})
    assert "features.dtype" in message and "float16" in message and "float32" in message


@pytest.mark.parametrize("config", [{}, {"dataset": {}}, {"dataset": {"num_classes": 3}}])
def test_missing_dataset_name_is_reported(config):
    message = config_error(config)
    assert "dataset" in message and "'name'" in message and "required" in message


def test_minimum_violation_names_key():
    message = config_error({**MINIMAL, "pca": {"rank_max": 0}})
    assert "pca.rank_max" in message


def test_bad_dataset_name_pattern():
    assert "dataset.name" in config_error({"dataset": {"name": "has space/slash"}})


def test_array_item_type_error_names_index():
    message = config_error({**MINIMAL, "standins": {"vae_channels": [32, "x"]}})
    assert "standins.vae_channels.1" in message


def test_every_error_is_reported_at_once():
    message = config_error({**MINIMAL, "pca": {"rank_max": "abc"}, "shard": {"workers": -1},
                            "features": {"grid": "big"}})
    for key in ("pca.rank_max", "shard.workers", "features.grid"):
        assert key in message


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError, match="mapping"):
        validate_config(["not", "a", "mapping"])


def test_source_is_named_in_the_error():
    with pytest.raises(ConfigError, match="my-source"):
        validate_config({}, source="my-source")


# --- YAML files ------------------------------------------------------------------------------------

def test_load_config_round_trip(tmp_path):
    wanted = {"dataset": {"name": "toy", "root": "/data/toy", "num_classes": 7},
              "pca": {"rank_max": 4, "sample_images": 100}, "train": {"rank": 4},
              "latents": {"encoder": {"name": "standin-vae", "weights": "out/vae"}, "flip": False},
              "standins": {"vae_channels": [8, 16], "holdout": 0.25}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(wanted))
    config = load_config(path)
    assert config == validate_config(wanted)
    assert config["dataset"]["root"] == "/data/toy"
    assert config["latents"]["encoder"] == {"name": "standin-vae", "weights": "out/vae"}
    assert config["latents"]["flip"] is False
    assert config["standins"]["vae_channels"] == [8, 16]
    assert config["pca"]["seed"] == 0  # default filled beside given keys
    # the loaded (complete) config is itself valid and stable
    assert validate_config(config) == config


def test_load_config_accepts_str_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: {name: toy}\n")
    assert load_config(str(path))["dataset"]["name"] == "toy"


def test_load_config_bad_value_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("dataset: {name: toy}\npca:\n  rank_max: abc\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "pca.rank_max" in str(info.value)


def test_load_config_missing_file_names_path(tmp_path):
    path = tmp_path / "nope" / "config.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_load_config_invalid_yaml_names_path(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("dataset: {name: toy\n  - [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "YAML" in str(info.value)


def test_load_config_empty_file_reports_missing_name(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match="name"):
        load_config(path)


# The shipped configs (config/*.yaml; there may be none yet) and the schema itself.
SHIPPED = sorted((REPO / "config").glob("*.yaml"))
OVERLAID = {"demo_full.yaml": "config.yaml"}  # overlay -> its base (demo_study_* -> demo_study.yaml)


@pytest.mark.parametrize("path", [*SHIPPED, "schema"], ids=[*(p.name for p in SHIPPED), "schema"])
def test_shipped_config_validates(path):
    if path == "schema":
        schema = load_schema()
        jsonschema.Draft7Validator.check_schema(schema)
        assert schema == raw_schema()
        assert validate_config(MINIMAL)["dataset"]["name"] == "toy"
        return
    base = OVERLAID.get(path.name, "demo_study.yaml" if path.name.startswith("demo_study_") else None)
    if base:  # an overlay: used on top of its base config
        from redi.runs import deep_merge

        base = yaml.safe_load((REPO / "config" / base).read_text())
        config = validate_config(deep_merge(base, yaml.safe_load(path.read_text())), source=str(path))
    else:
        config = load_config(path)
    assert config["dataset"]["name"]


def test_schema_defaults_satisfy_their_own_schema():
    schema = raw_schema()
    definitions = schema["definitions"]
    for section, node in schema["properties"].items():
        subs = node.get("properties", {section: node})
        for sub in subs.values():
            if "default" not in sub:
                continue
            default = sub["default"]
            if "$ref" in sub:
                sub = definitions[sub["$ref"].rsplit("/", 1)[-1]]
            jsonschema.Draft7Validator({**sub, "definitions": definitions}).validate(default)


def test_every_key_but_dataset_name_has_a_default():
    schema = raw_schema()
    missing = [f"{section}.{key}" for section, node in schema["properties"].items()
               for key, sub in node.get("properties", {}).items() if "default" not in sub]
    assert missing == ["dataset.name"]


# --- CLI flags from the schema ---------------------------------------------------------------------

def parser_for(keys: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t")
    parser.add_argument("--configfile")
    add_config_flags(parser, keys)
    return parser


def test_flags_are_named_after_keys_and_typed():
    args = parser_for({"pca": None, "standins": ["vae_channels", "holdout"]}).parse_args(
        ["--rank-max", "8", "--sample-images", "20", "--vae-channels", "8", "16", "--holdout", "0.5"])
    values = vars(args)
    assert values["pca.rank_max"] == 8
    assert values["pca.sample_images"] == 20
    assert values["standins.vae_channels"] == [8, 16]
    assert values["standins.holdout"] == 0.5


def test_flags_not_given_stay_out_of_the_namespace():
    values = vars(parser_for({"pca": None}).parse_args(["--rank-max", "3"]))
    assert "pca.seed" not in values and "pca.sample_images" not in values


def test_only_the_selected_keys_get_flags():
    parser = parser_for({"pca": ["rank_max"]})
    with pytest.raises(SystemExit):
        parser.parse_args(["--seed", "1"])


def test_flag_with_wrong_type_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit):
        parser_for({"pca": ["rank_max"]}).parse_args(["--rank-max", "abc"])


def test_boolean_enum_nullable_and_nested_flags():
    parser = parser_for({"latents": None})
    values = vars(parser.parse_args(["--no-flip", "--dtype", "float32", "--encoder-name", "standin-vae",
                                     "--encoder-weights", "none"]))
    assert values["latents.flip"] is False
    assert values["latents.dtype"] == "float32"
    assert values["latents.encoder.name"] == "standin-vae"
    assert values["latents.encoder.weights"] is None
    assert vars(parser.parse_args(["--flip"]))["latents.flip"] is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "int8"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--encoder-name", "vae-xl"])


def test_config_from_args_defaults_then_file_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"dataset": {"name": "fromfile"},
                                    "pca": {"rank_max": 16, "seed": 5}, "shard": {"workers": 0},
                                    "train": {"rank": 4}}))
    parser = parser_for({"pca": None, "shard": None})
    config = config_from_args(parser.parse_args(["--configfile", str(path), "--rank-max", "4"]),
                              ["pca", "shard"])
    assert config["pca"]["rank_max"] == 4           # flag beats file
    assert config["pca"]["seed"] == 5               # file beats schema
    assert config["pca"]["sample_images"] == 300000  # schema default
    assert config["shard"]["workers"] == 0
    assert config["dataset"]["name"] == "fromfile"


def test_config_from_args_without_file_uses_schema_defaults():
    parser = parser_for({"pca": None})
    config = config_from_args(parser.parse_args([]), ["pca"])
    assert config["pca"]["rank_max"] == 32
    assert config["dataset"]["name"] == "cli"


def test_config_from_args_ignores_flags_of_other_sections():
    namespace = argparse.Namespace(configfile=None, **{"pca.rank_max": 4, "shard.workers": 0})
    config = config_from_args(namespace, ["pca"])
    assert config["pca"]["rank_max"] == 4
    assert config["shard"]["workers"] == 2  # not a section of this stage: left at the default


def test_config_from_args_validates_flag_values():
    namespace = argparse.Namespace(configfile=None, **{"pca.rank_max": 0})
    with pytest.raises(ConfigError, match="pca.rank_max"):
        config_from_args(namespace, ["pca"])


def test_every_key_has_a_baseline_and_no_baseline_is_stale():
    from redi.config import load_baseline, schema_defaults

    defaults, baseline = schema_defaults(), load_baseline()
    missing = sorted(set(defaults) - set(baseline))
    assert not missing, f"add to redi/config.baseline.yaml the value that keeps the old behaviour: {missing}"
    assert not sorted(set(baseline) - set(defaults)), "baseline lines for keys the schema no longer has"


def test_identity_leaves_out_keys_at_their_baseline_only():
    from redi.config import identity, load_baseline

    baseline = load_baseline()
    values = {"train": {"lr": baseline["train.lr"], "steps": 7,
                        "model": {"size": baseline["train.model.size"], "depth": 3}},
              "latents": {"encoder": {"name": "standin-vae", "weights": baseline["latents.encoder.weights"]}},
              "checkpoint": None}
    assert identity(values) == {"train": {"steps": 7, "model": {"depth": 3}},
                                "latents": {"encoder": {"name": "standin-vae"}}, "checkpoint": None}
