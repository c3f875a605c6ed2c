"""Faults and hostile input, as a user's cluster meets them: each stops with one line
`redi <stage>: error: ...`, leaves nothing that looks complete, and a rerun once the fault is gone
finishes the job."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from conftest import write_tiny_vae
from PIL import Image

from redi.cli import main
from redi.data.shard import write_shards
from redi.runs import expand_runs

REPO = Path(__file__).resolve().parents[1]


def one_line_error(stderr: str, stage: str) -> str:
    """The error line a stage printed; fails unless it is the only `error:` line and one line long."""
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr[-2000:]
    assert lines[0].startswith(f"redi {stage}: error: "), lines[0]
    assert "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


# --- 1. a full disk -----------------------------------------------------------------------------

class SmallDisk:
    """A size-limited folder: a tmpfs mounted as root, else a process file-size limit (RLIMIT_FSIZE).

    `run(args, ...)` runs `redi` in a subprocess under the limit; `grow()` lifts it.
    """

    def __init__(self, folder: Path, size_kib: int):
        self.folder = folder
        folder.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(folder)],
                                 capture_output=True)
        self.tmpfs = mounted.returncode == 0
        self.limit = None if self.tmpfs else size_kib * 1024

    def grow(self) -> None:
        if self.tmpfs:
            subprocess.run(["mount", "-o", "remount,size=64m", str(self.folder)], check=True)
        self.limit = None

    def run(self, args: list[str], patch: str = "") -> subprocess.CompletedProcess:
        """`redi *args` in a fresh process (HDF5 failures end it); `patch` is Python run first."""
        limit = self.limit
        prelude = textwrap.dedent(f"""
            import resource, shutil, signal, sys
            if {limit!r} is not None:  # no tmpfs: a file-size limit, reported as free space too
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, ({limit!r}, {limit!r}))
                real = shutil.disk_usage
                shutil.disk_usage = lambda p: real(p)._replace(free={limit!r})
        """)
        run_cli = "\nfrom redi.cli import main\nsys.exit(main(sys.argv[1:]))\n"
        script = prelude + textwrap.dedent(patch) + run_cli
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                              timeout=300)

    def close(self) -> None:
        if self.tmpfs:
            subprocess.run(["umount", str(self.folder)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    disk = SmallDisk(tmp_path / "disk", 600)
    yield disk
    disk.close()


@pytest.fixture(scope="module")
def latent_inputs(tmp_path_factory):
    """200 sharded 32 px images and a tiny f=2 VAE: 1.6 MiB of latents, more than the 600 KiB disk
    (whose first 64-row chunks, 512 KiB, fit)."""
    root = tmp_path_factory.mktemp("fault-inputs")
    rng = np.random.default_rng(0)
    for k in range(200):
        folder = root / "images" / f"c{k % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{k:03d}.png")
    write_shards(root / "images", root / "shards", image_size=32, shard_size=50, workers=0)
    vae = write_tiny_vae(root / "vae")
    args = ["--shards", str(root / "shards" / "manifest.json"), "--encoder-weights", str(vae),
            "--batch-size", "16", "--workers", "0", "--device", "cpu"]
    assert main(["encode-latents", *args, "--out", str(root / "reference" / "latents.h5")]) == 0
    return args, root / "reference" / "latents.h5"


def assert_same_h5(got: Path, expected: Path) -> None:
    with h5py.File(got) as a, h5py.File(expected) as b:
        assert sorted(a) == sorted(b)
        for name in b:
            np.testing.assert_array_equal(a[name][:], b[name][:])
        assert a["done"][:].all()


def test_a_full_disk_mid_hdf5_stage_keeps_the_partial_and_resumes(latent_inputs, small_disk):
    """HDF5 row writes that hit ENOSPC stop the stage (not 'Exception ignored', not a segfault)."""
    args, reference = latent_inputs
    out = small_disk.folder / "latents.h5"
    # as on a filesystem where the space check passes and reserved chunks still need new blocks
    # (copy-on-write) or another job fills the disk meanwhile: no check, no reservation
    no_reserve = """
        import redi.h5store as h5store
        h5store._check_room = lambda *args: None
        h5store._reserving_dcpl = lambda: None
    """
    done = small_disk.run(["encode-latents", *args, "--out", str(out)], patch=no_reserve)
    assert done.returncode == 2, done.stderr[-2000:]
    line = one_line_error(done.stderr, "encode-latents")
    assert "latents.h5.partial" in line and ("No space left" in line or "too large" in line), line
    assert "Exception ignored" not in done.stderr
    assert not out.exists() and not out.with_name("manifest.json").exists()
    partial = out.with_name("latents.h5.partial")
    assert partial.exists()
    with h5py.File(partial) as f:
        done_rows = int(f["done"][:].sum())
    assert 0 < done_rows < 200
    small_disk.grow()
    again = small_disk.run(["encode-latents", *args, "--out", str(out)])
    assert again.returncode == 0, again.stderr[-2000:]
    assert not partial.exists() and out.with_name("manifest.json").exists()
    assert_same_h5(out, reference)


def test_a_disk_without_room_for_the_hdf5_file_is_refused_before_it_starts(latent_inputs, small_disk):
    args, reference = latent_inputs
    out = small_disk.folder / "latents.h5"
    done = small_disk.run(["encode-latents", *args, "--out", str(out)])
    assert done.returncode == 2
    line = one_line_error(done.stderr, "encode-latents")
    assert re.search(r"latents.h5.partial needs 2.6 MiB but .* has 6\d\d.\d KiB free", line), line
    assert list(small_disk.folder.iterdir()) == []
    small_disk.grow()
    assert small_disk.run(["encode-latents", *args, "--out", str(out)]).returncode == 0
    assert_same_h5(out, reference)


def test_a_full_disk_under_an_atomic_writer_leaves_no_file(latent_inputs, small_disk, tmp_path):
    """fit-pca (np.savez through atomic_path): the npz is fsynced before its rename."""
    features = tmp_path / "features.h5"
    with h5py.File(features, "w") as f:
        f["tokens"] = np.random.default_rng(0).standard_normal((20, 16, 64)).astype(np.float16)
    (tmp_path / "manifest.json").write_text("{}")
    filler = small_disk.folder / "filler"
    free = shutil.disk_usage(small_disk.folder).free if small_disk.tmpfs else small_disk.limit
    filler.write_bytes(b"\0" * (free - 8192))  # leaves less than the 33 KiB pca.npz needs
    out = small_disk.folder / "pca" / "pca.npz"
    done = small_disk.run(["fit-pca", "--features", str(features), "--out", str(out)])
    assert done.returncode == 2, done.stderr[-2000:]
    line = one_line_error(done.stderr, "fit-pca")
    assert "free space and rerun" in line, line
    assert sorted(p.name for p in out.parent.iterdir()) == []
    filler.unlink()
    small_disk.grow()
    assert small_disk.run(["fit-pca", "--features", str(features), "--out", str(out)]).returncode == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["manifest.json", "pca.npz"]


# --- 2. hostile images: size caps before any resize, high bit depths, odd folder entries ---------

def shard_one(root: Path, out: Path, **caps) -> dict:
    """Shard `root` in this process (so tracemalloc and monkeypatches see the work)."""
    return write_shards(root, out, image_size=16, shard_size=100, workers=0, **caps)


def skips(manifest: dict) -> dict[str, str]:
    return {Path(entry["path"]).name: entry["reason"] for entry in manifest["skipped"]}


def good_images(folder: Path, count: int = 2) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        Image.fromarray(np.full((20, 24, 3), 40 * k, dtype=np.uint8)).save(folder / f"good{k}.png")


def test_a_300000x1_png_is_skipped_from_its_header(tmp_path, monkeypatch):
    root = tmp_path / "images"
    good_images(root / "a")
    Image.fromarray(np.zeros((1, 300000), dtype=np.uint8)).save(root / "a" / "wide.png")
    assert (root / "a" / "wide.png").stat().st_size < 1000
    resized = []
    real_resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda im, size, **kw: resized.append(im.size)
                        or real_resize(im, size, **kw))
    tracemalloc.start()
    manifest = shard_one(root, tmp_path / "shards")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert skips(manifest) == {"wide.png": "aspect ratio of 300000x1 exceeds shard.max_aspect_ratio = 20"}
    assert manifest["num_samples"] == 2 and (300000, 1) not in resized
    assert peak < 20 * 2**20, peak  # uncapped, the upscale to 4.8M x 16 px RGB copies 230 MB to numpy
    capped = shard_one(root, tmp_path / "capped", max_pixels=480, max_aspect_ratio=1e6)
    assert skips(capped) == {"wide.png": "300000x1 = 300000 pixels exceeds shard.max_pixels = 480"}


def shard_pixels(manifest_path: Path) -> dict[str, np.ndarray]:
    from redi.data.reader import iter_batches

    (indices, images, labels), = list(iter_batches(manifest_path, batch_size=100))
    return {int(i): img.numpy() for i, img in zip(indices, images, strict=True)}


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    from redi.data.crop import adm_center_crop

    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    ramp = np.tile(np.linspace(0, 65535, 40).round().astype(np.uint16), (32, 1))  # 40 wide, 32 high
    Image.fromarray(ramp).save(root / "a" / "0-ramp16.png")
    assert Image.open(root / "a" / "0-ramp16.png").mode == "I;16"
    Image.fromarray(np.full((32, 32), 0.5, dtype=np.float32)).save(root / "a" / "1-half.tif")
    Image.fromarray(np.full((32, 32), 4.0, dtype=np.float32)).save(root / "a" / "2-hdr.tif")
    Image.fromarray(np.full((32, 32), 70000, dtype=np.int32)).save(root / "a" / "3-wide-int.tif")
    manifest = shard_one(root, tmp_path / "shards")
    assert set(skips(manifest)) == {"2-hdr.tif", "3-wide-int.tif"}
    assert "outside [0, 1]" in skips(manifest)["2-hdr.tif"]
    assert "beyond 16 bits" in skips(manifest)["3-wide-int.tif"]
    pixels = shard_pixels(tmp_path / "shards" / "manifest.json")
    # the ramp as an 8-bit image made with numpy, then the same crop: a ramp from black to white
    eight_bit = Image.fromarray(np.round(ramp / 257).astype(np.uint8)).convert("RGB")
    np.testing.assert_array_equal(pixels[0], adm_center_crop(eight_bit, 16))
    assert pixels[0][:, 0].max() < 40 and pixels[0][:, -1].min() > 215
    assert (np.diff(pixels[0][8, :, 0].astype(int)) >= 0).all()
    np.testing.assert_array_equal(pixels[1], np.full((16, 16, 3), 128, dtype=np.uint8))  # 0.5 * 255


def test_odd_folder_entries_are_listed_as_skipped_never_followed(tmp_path):
    outside = tmp_path / "outside.png"
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(outside)
    root = tmp_path / "images"
    good_images(root / "a")
    folder = root / "a"
    (folder / "escape.png").symlink_to(outside)
    (folder / "dangling.png").symlink_to(folder / "missing.png")
    (folder / "null.png").symlink_to("/dev/null")
    (folder / "inside.png").symlink_to(folder / "good1.png")  # a link within the folder is an image
    os.mkfifo(folder / "fifo.png")  # opening it would block the stage forever
    (folder / "dir.png").mkdir()
    manifest = shard_one(root, tmp_path / "shards")
    reasons = skips(manifest)
    assert reasons == {
        "escape.png": f"symlink leaving the dataset folder (-> {outside})",
        "dangling.png": f"dangling symlink (-> {folder / 'missing.png'})",
        "null.png": "symlink leaving the dataset folder (-> /dev/null)",
        "fifo.png": "not a regular file (a FIFO)",
        "dir.png": "not a regular file (a folder)",
    }
    assert manifest["num_samples"] == 3  # good0, good1 and the link to good1


# --- 5. settings of different stages that cannot work together, refused when the config loads --

CROSS_STAGE = {
    "rank-above-rank-max": ({"train": {"rank": 16}, "pca": {"rank_max": 8}},
                            "train.rank = 16 exceeds pca.rank_max = 8"),
    "rank-max-above-dinov2": ({"pca": {"rank_max": 1024}, "train": {"rank": 8}},
                              "pca.rank_max = 1024 exceeds the feature dimension 768 (the dinov2-vitb14-reg4 "
                              "features)"),
    "rank-max-above-standin": ({"features": {"encoder": {"name": "standin-vit"}},
                                "standins": {"vit_dim": 16}, "pca": {"rank_max": 32}},
                               "pca.rank_max = 32 exceeds the feature dimension 16 (standins.vit_dim)"),
    "batch-above-demo": ({"demo_data": {"per_class": 3}, "train": {"batch_size": 64}},
                         "train.batch_size = 64 exceeds the 30 images of demo_data.per_class = 3"),
    "lr-1e39": ({"train": {"lr": 1e39}}, "train.lr = 1e+39 does not fit in float32"),
}


@pytest.mark.parametrize("case", CROSS_STAGE.values(), ids=CROSS_STAGE)
def test_cross_stage_settings_are_refused_at_load(case, tmp_path):
    from redi.config import load_config
    from redi.errors import ConfigError

    settings, message = case
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"dataset": {"name": "toy"}, **settings}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)
    # the same keys in a run of the grid name the run
    runs = {"dataset": {"name": "toy"}, "runs": {"bad": {k: v for k, v in settings.items() if k == "train"}}}
    if "train" in settings and len(settings) == 1:
        path.write_text(yaml.safe_dump(runs))
        with pytest.raises(ConfigError, match="run 'bad'"):
            expand_runs(load_config(path))


def test_a_consistent_config_and_a_real_dataset_pass(tmp_path):
    from redi.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"dataset": {"name": "toy", "root": "/data"}, "train": {"batch_size": 4096,
                                    "rank": 32}, "pca": {"rank_max": 32}}))
    assert load_config(path)["train"]["batch_size"] == 4096  # the folder's size is not known yet


def test_lr_1e39_on_the_command_line_is_one_line(tmp_path, capsys):
    args = ["--latents", "l.h5", "--features", "f.h5", "--out", str(tmp_path), "--lr", "1e39"]
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert one_line_error(err, "train") == "redi train: error: invalid command line:"
    assert err.splitlines()[-1].startswith("  train.lr = 1e+39 does not fit in float32")  # a line a problem


# --- 4. unreadable inputs and unwritable outputs: one line each ------------------------------------

def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_truncated_latest_checkpoint_falls_back_to_the_older_one(tmp_path, capsys):
    import torch
    from test_train import train_cfg, write_inputs

    from redi.train import train

    latents, features = write_inputs(tmp_path / "data")
    cfg = train_cfg(steps=6, ckpt_every=2, keep_checkpoints=3, log_every=2)
    train(cfg, latents, features, tmp_path / "clean", "cpu", quiet=True)
    run = tmp_path / "run"
    train({**cfg, "steps": 4}, latents, features, run, "cpu", quiet=True)
    truncate(run / "checkpoints" / "step-000000004.pt")
    capsys.readouterr()
    train(cfg, latents, features, run, "cpu", quiet=True)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("redi train: warning: ")
    assert "step-000000004.pt cannot be loaded" in warnings[0] and "resuming from an older" in warnings[0]
    assert (run / "checkpoints" / "step-000000004.pt.unreadable").exists()
    clean, resumed = (torch.load(p / "final.pt", weights_only=True) for p in (tmp_path / "clean", run))
    assert resumed["step"] == 6
    for key, value in clean["ema"].items():  # resumed from step 2: the same weights as never stopped
        torch.testing.assert_close(resumed["ema"][key], value, rtol=0, atol=0)


def test_an_unloadable_final_pt_is_one_line(tmp_path, capsys):
    bad = tmp_path / "final.pt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    assert main(["sample", "--checkpoint", str(bad), "--out", str(tmp_path / "s"), "--device", "cpu"]) == 2
    line = one_line_error(capsys.readouterr().err, "sample")
    assert f"{bad} cannot be loaded (" in line and "delete it and rerun" in line
    assert not (tmp_path / "s" / "samples.npz").exists()


def test_object_arrays_in_an_npz_are_refused_without_unpickling(tmp_path, capsys):
    from redi.errors import ReDiError
    from redi.pca import load_pca

    ref = tmp_path / "reference.npz"
    np.savez(ref, mu=np.zeros(3), sigma=np.array([{"a": 1}], dtype=object))
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    assert main(["evaluate", "--reference", str(ref), "--samples", str(samples), "--out",
                 str(tmp_path / "m.json"), "--device", "cpu"]) == 2
    line = one_line_error(capsys.readouterr().err, "evaluate")
    assert f"reference statistics {ref} cannot be read: it holds object arrays" in line
    assert not (tmp_path / "m.json").exists()
    np.savez(tmp_path / "pca.npz", components=np.array([None], dtype=object))
    with pytest.raises(ReDiError, match="PCA file .*pca.npz cannot be read: it holds object arrays"):
        load_pca(tmp_path / "pca.npz")
    truncate(ref)
    with pytest.raises(ReDiError, match="it is not a complete .npz"):
        load_pca(ref)


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def png_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["../000000000.png", "evil.png", "000000000.exe"])
def test_bad_tar_member_names_are_one_line(name, tmp_path):
    from redi.data.reader import iter_batches
    from redi.errors import ReDiError
    from redi.sample import read_shard

    shard = tmp_path / "shard-000000.tar"
    write_tar(shard, {"000000001.png": png_bytes(), name: png_bytes()})
    with pytest.raises(ReDiError, match=f"holds '{re.escape(name)}', not <index>.png"):
        read_shard(shard)
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"shards": [{"file": "shard-000000.tar", "first_index": 0, "count": 2}]}')
    write_tar(shard, {"000000000.png": png_bytes(), "000000000.cls": b"0", name: png_bytes()})
    if name.endswith(".exe"):  # an extra file of a good sample: the data reader takes png + cls only
        assert [len(images) for _, images, _ in iter_batches(manifest, batch_size=4)] == [1]
        return
    with pytest.raises(ReDiError, match="not <index>.png \\+ <index>.cls: rerun the shard stage"):
        list(iter_batches(manifest, batch_size=4))


def test_a_read_only_results_folder_is_one_line_and_resumes_when_writable(small_disk, tmp_path):
    if not small_disk.tmpfs:
        pytest.skip("needs a filesystem to remount read-only (root and tmpfs)")
    features = tmp_path / "features.h5"
    with h5py.File(features, "w") as f:
        f["tokens"] = np.random.default_rng(0).standard_normal((20, 16, 64)).astype(np.float16)
    (tmp_path / "manifest.json").write_text("{}")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk.folder)], check=True)
    out = small_disk.folder / "pca" / "pca.npz"
    done = small_disk.run(["fit-pca", "--features", str(features), "--out", str(out)])
    assert done.returncode == 2, done.stderr[-2000:]
    line = one_line_error(done.stderr, "fit-pca")
    assert "Read-only file system; make the results folder writable" in line, line
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk.folder)], check=True)
    assert small_disk.run(["fit-pca", "--features", str(features), "--out", str(out)]).returncode == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["manifest.json", "pca.npz"]
