"""`redi <stage>`: parsing, config precedence, one-line errors and a small real run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from redi.cli import build_parser, main
from redi.config import config_from_args, load_schema
from redi.stages import STAGES, stage_config

STAGE_NAMES = sorted(STAGES)


def redi_script() -> str:
    script = shutil.which("redi") or str(Path(sys.executable).with_name("redi"))
    assert Path(script).is_file(), "the `redi` console script is not installed"
    return script


def run_redi(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([redi_script(), *argv], capture_output=True, text=True, timeout=60)


def expected_flags(stage: str) -> list[str]:
    """The config flags a stage's --help must list: one per key it reads."""
    schema = load_schema()["properties"]
    flags = []
    for section, keys in STAGES[stage].keys.items():
        for key in keys if keys is not None else schema[section]["properties"]:
            flags.append("--" + key.replace("_", "-"))  # nested keys: --encoder -> --encoder-name
    return flags


def one_error_line(err: str, stage: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"redi {stage}: error:"), err
    assert "Traceback" not in err
    return lines[0]


# --- help, as a subprocess ---------------------------------------------------------------------------

def test_help_subprocess():
    result = run_redi("--help")
    assert result.returncode == 0, result.stderr
    for stage in STAGE_NAMES:
        assert stage in result.stdout


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_stage_help_subprocess(stage):
    result = run_redi(stage, "--help")
    assert result.returncode == 0, result.stderr
    assert "--configfile" in result.stdout
    for flag in expected_flags(stage):
        assert flag in result.stdout, f"{flag} missing from `redi {stage} --help`"


def test_no_stage_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_unknown_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit-pca", "--features", "f.h5", "--out", "p.npz", "--rank-max", "3"])
    assert info.value.code == 2  # fit-pca reads no pca key


# --- errors in process: one line, exit status 2 -------------------------------------------------

def test_missing_input_folder(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "folder"
    code = main(["shard", "--input", str(missing), "--out", str(tmp_path / "out")])
    assert code == 2
    captured = capsys.readouterr()
    assert str(missing) in one_error_line(captured.err, "shard")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_encoder_weights(tmp_path, capsys):
    code = main(["encode-latents", "--shards", str(tmp_path / "manifest.json"),
                 "--out", str(tmp_path / "latents.h5"), "--device", "cpu",
                 "--encoder-name", "standin-vae", "--encoder-weights", "/no/such/dir"])
    assert code == 2
    assert "/no/such/dir" in one_error_line(capsys.readouterr().err, "encode-latents")


def test_bad_type_in_configfile(tmp_path, tiny_image_folder, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"dataset": {"name": "t", "num_classes": 3},
                                      "shard": {"image_size": "big"}}))
    code = main(["shard", "--input", str(tiny_image_folder), "--out", str(tmp_path / "out"),
                 "--configfile", str(config)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("redi shard: error:")
    assert "shard.image_size" in err and "integer" in err and str(config) in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_missing_configfile(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    code = main(["fit-pca", "--features", "f.h5", "--out", "p.npz", "--configfile", str(missing)])
    assert code == 2
    assert str(missing) in one_error_line(capsys.readouterr().err, "fit-pca")


def test_num_classes_mismatch_is_one_line(tmp_path, tiny_image_folder, capsys):
    code = main(["shard", "--input", str(tiny_image_folder), "--out", str(tmp_path / "out"),
                 "--workers", "0"])  # default dataset.num_classes is 1000, the folder has 3
    assert code == 2
    line = one_error_line(capsys.readouterr().err, "shard")
    assert "1000" in line and "num_classes" in line


# --- config precedence through the real parser -----------------------------------------------------

def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_flags_override_configfile(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "dataset": {"name": "fromfile", "num_classes": 3},
        "shard": {"image_size": 64, "shard_size": 7, "workers": 1, "max_pixels": 5000, "max_aspect_ratio": 4},
        "pca": {"rank_max": 12},
    }))
    args = parse("shard", "--input", "in", "--out", "out", "--configfile", str(config),
                 "--image-size", "32", "--workers", "0", "--max-aspect-ratio", "2.5")
    full = config_from_args(args, list(STAGES["shard"].keys))
    shard = {"image_size": 32, "shard_size": 7, "workers": 0, "max_pixels": 5000, "max_aspect_ratio": 2.5}
    assert full["shard"] == shard
    assert full["dataset"]["name"] == "fromfile" and full["dataset"]["num_classes"] == 3
    assert full["pca"]["rank_max"] == 12  # other sections of the file are kept in the full config
    assert stage_config(full, "shard") == {"shard": shard, "dataset": {"num_classes": 3}}


def test_flags_without_configfile_use_schema_defaults():
    args = parse("shard", "--input", "in", "--out", "out", "--shard-size", "5")
    cfg = stage_config(config_from_args(args, list(STAGES["shard"].keys)), "shard")
    assert cfg == {"shard": {"image_size": 256, "shard_size": 5, "workers": 2, "max_pixels": 100_000_000,
                             "max_aspect_ratio": 20},
                   "dataset": {"num_classes": 1000}}


def test_nested_boolean_and_nullable_flags(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"dataset": {"name": "t"},
                                      "latents": {"encoder": {"name": "standin-vae", "weights": "w/vae"},
                                                  "flip": True}}))
    args = parse("encode-latents", "--shards", "s", "--out", "o", "--configfile", str(config),
                 "--no-flip", "--encoder-weights", "none", "--dtype", "float32")
    latents = config_from_args(args, list(STAGES["encode-latents"].keys))["latents"]
    assert latents["flip"] is False
    assert latents["dtype"] == "float32"
    assert latents["encoder"] == {"name": "standin-vae", "weights": None}


@pytest.mark.parametrize("stage, section, default_name", [
    ("encode-latents", "latents", "sd-vae"),
    ("extract-features", "features", "dinov2-vitb14-reg4"),
])
def test_encoder_weights_flag_alone_keeps_the_default_encoder(stage, section, default_name):
    # Every key but dataset.name has a default, so giving only the weights must keep the
    # section's default encoder name instead of failing with "'name' is a required property".
    args = parse(*stage_argv(stage), "--encoder-weights", "/models/encoder")
    encoder = config_from_args(args, list(STAGES[stage].keys))[section]["encoder"]
    assert encoder == {"name": default_name, "weights": "/models/encoder"}


def test_stage_config_drops_resource_keys():
    args = parse("encode-latents", "--shards", "s", "--out", "o", "--batch-size", "8", "--workers", "0")
    full = config_from_args(args, list(STAGES["encode-latents"].keys))
    with_resources = stage_config(full, "encode-latents")
    assert with_resources["latents"]["batch_size"] == 8 and with_resources["latents"]["workers"] == 0
    without = stage_config(full, "encode-latents", resources=False)
    assert without == {"latents": {"encoder": full["latents"]["encoder"], "flip": True,
                                   "dtype": "float16"}}


def test_stage_config_selects_keys_per_stage():
    args = parse("project-features", "--shards", "s", "--pca", "p", "--out", "o", "--rank-max", "4")
    full = config_from_args(args, list(STAGES["project-features"].keys))
    assert stage_config(full, "project-features", resources=False) == {
        "features": {"encoder": full["features"]["encoder"], "grid": 16, "dtype": "float16"},
        "pca": {"rank_max": 4},
        "latents": {"flip": True},
    }
    assert stage_config(full, "fit-pca") == {}
    assert set(stage_config(full, "shard", resources=False)["shard"]) == {
        "image_size", "shard_size", "max_pixels", "max_aspect_ratio"}


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_stage_config_without_resources_has_no_resource_keys(stage):
    full = config_from_args(parse(*stage_argv(stage)), list(STAGES[stage].keys))
    with_resources = stage_config(full, stage)
    without = stage_config(full, stage, resources=False)
    assert set(without) == set(with_resources) == set(STAGES[stage].keys)
    for section, values in without.items():
        if section in ("shard", "latents", "features"):  # data-parallel readers: speed only
            assert not {"workers", "batch_size"} & set(values), section
        dropped = set(with_resources[section]) - set(values)
        speed_only = {"shard": {"workers"}, "latents": {"workers", "batch_size"},
                      "features": {"workers", "batch_size"},
                      "train": {"ckpt_every", "keep_checkpoints", "snapshot_steps", "log_every", "compile",
                                "tensorboard"},
                      "sample": {"batch_size"}, "evaluate": {"batch_size"}}.get(section, set())
        assert dropped == (speed_only & set(with_resources[section])), section
        assert set(values) <= set(full[section])
    if stage.startswith("train-standin-"):  # the training batch size changes the trained weights: kept
        assert without["standins"]["batch_size"] == 64
    if stage == "train":
        assert without["train"]["batch_size"] == 256 and "steps" in without["train"]


def test_stage_config_returns_a_copy():
    full = config_from_args(parse(*stage_argv("encode-latents")), ["latents"])
    part = stage_config(full, "encode-latents")
    part["latents"]["encoder"]["name"] = "changed"
    assert full["latents"]["encoder"]["name"] == "sd-vae"


def stage_argv(stage: str) -> list[str]:
    """`<stage>` and its required path flags (from the registry), each given the path x."""
    return [stage, *(arg for path in STAGES[stage].paths if path.required for arg in (path.flag, "x"))]


# --- a real run: demo-data then shard ------------------------------------------------------------

def test_demo_data_then_shard(tmp_path, capsys):
    demo = tmp_path / "demo"
    assert main(["demo-data", "--out", str(demo), "--per-class", "2"]) == 0
    demo_manifest = json.loads((demo / "manifest.json").read_text())
    assert demo_manifest["stage"] == "demo-data"
    assert demo_manifest["counts_per_class"] == {str(d): 2 for d in range(10)}
    assert demo_manifest["config"] == {"demo_data": {"per_class": 2}}
    assert len(list((demo / "images").rglob("*.png"))) == 20

    shards = tmp_path / "shards"
    code = main(["shard", "--input", str(demo / "images"), "--out", str(shards), "--image-size", "32",
                 "--num-classes", "10", "--shard-size", "8", "--workers", "0"])
    assert code == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["stage"] == "shard"
    assert manifest["num_samples"] == 20 and manifest["skipped"] == []
    assert manifest["classes"] == [str(d) for d in range(10)]
    assert [s["count"] for s in manifest["shards"]] == [8, 8, 4]
    assert all((shards / s["file"]).is_file() for s in manifest["shards"])
    assert manifest["config"] == {"shard": {"image_size": 32, "shard_size": 8, "workers": 0,
                                            "max_pixels": 100_000_000, "max_aspect_ratio": 20},
                                  "dataset": {"num_classes": 10}}
    assert len(manifest["config_hash"]) == 12
    assert "Traceback" not in capsys.readouterr().err


def test_a_missing_pca_input_is_one_line(tmp_path, capsys):
    code = main(["fit-pca", "--features", str(tmp_path / "none.h5"), "--out", str(tmp_path / "p.npz")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and "none.h5" in err and err.startswith("redi fit-pca: error:")


def test_an_encoder_of_the_wrong_kind_is_refused_by_name():
    from redi.encoders import load_encoder
    from redi.errors import ReDiError

    with pytest.raises(ReDiError, match="standin-vit' is a vit; this stage needs one of: sd-vae"):
        load_encoder("standin-vit", "/whatever", kind="vae")
