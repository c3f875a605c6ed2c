"""shard: image folder listing, tar shards with a manifest, and reading them back."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from redi.data.crop import adm_center_crop
from redi.data.reader import iter_batches, shard_paths
from redi.data.shard import list_image_folder, write_shards
from redi.errors import ReDiError

SIZE = 16
VALID_COUNTS = {"a": 2, "b": 3, "c": 1}  # readable images per class written by tiny_image_folder
NUM_VALID = sum(VALID_COUNTS.values())


def add_bad_files(root: Path) -> dict[str, Path]:
    """A corrupt PNG, a truncated JPEG and a text file among the good images."""
    rng = np.random.default_rng(1)
    corrupt = root / "b" / "x.png"
    corrupt.write_bytes(rng.bytes(400))
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    data = buffer.getvalue()
    truncated = root / "a" / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    text = root / "c" / "notes.txt"
    text.write_text("not an image\n")
    return {"corrupt": corrupt, "truncated": truncated, "text": text}


def good_sources(root: Path, layout: dict) -> list[tuple[Path, int]]:
    """(file, label) of the readable images, in the order shard must index them."""
    assert {name: len(files) for name, files in layout.items()} == VALID_COUNTS
    classes = sorted(layout)
    return [(root / name / file, classes.index(name))
            for name in classes for file, _ in sorted(layout[name])]


def read_all(manifest_path: Path, batch_size: int = 4, workers: int = 0, todo=None):
    indices, images, labels = [], [], []
    for idx, img, lab in iter_batches(manifest_path, batch_size, workers=workers, todo=todo):
        assert idx.ndim == 1 and img.shape[1:] == (SIZE, SIZE, 3) and len(lab) == len(idx)
        indices += idx.tolist()
        images += list(img.numpy())
        labels += lab.tolist()
    return indices, images, labels


# --- list_image_folder -----------------------------------------------------------------------------

def test_labels_follow_sorted_class_folders(tmp_path):
    root = tmp_path / "images"
    names = ["zebra", "Apple", "n01440764", "10", "9"]
    for name in names:
        (root / name).mkdir(parents=True)
        for file in ("f2.png", "f10.png", "f1.png"):
            (root / name / file).write_bytes(b"")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "h.png").write_bytes(b"")
    (root / "stray_file.png").write_bytes(b"")
    (root / "9" / ".DS_Store").write_bytes(b"")
    classes, items = list_image_folder(root)
    assert classes == ["10", "9", "Apple", "n01440764", "zebra"]  # code-point order, no hidden dirs
    for path, label in items:
        assert classes[label] == path.parent.name
        assert not path.name.startswith(".")
    assert [p.parent.name for p, _ in items] == sorted(p.parent.name for p, _ in items)
    zebra = [p.name for p, _ in items if p.parent.name == "zebra"]
    assert zebra == ["f1.png", "f10.png", "f2.png"]  # sorted within a class
    assert len(items) == 15


def test_list_tiny_folder(tiny_image_folder, tiny_folder_layout):
    classes, items = list_image_folder(tiny_image_folder, num_classes=3)
    assert classes == ["a", "b", "c"]
    assert items == good_sources(tiny_image_folder, tiny_folder_layout)


def test_missing_folder_names_path(tmp_path):
    missing = tmp_path / "no" / "such"
    with pytest.raises(ReDiError) as info:
        list_image_folder(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(ReDiError, match=str(missing)):
        write_shards(missing, tmp_path / "out", SIZE, workers=0)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_folder_without_class_folders(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "img.png").write_bytes(b"")
    with pytest.raises(ReDiError, match="no class folders"):
        list_image_folder(tmp_path / "flat")


def test_empty_class_folder_names_that_folder(tiny_image_folder):
    empty = tiny_image_folder / "bb_empty"
    empty.mkdir()
    (empty / ".keep").write_text("")  # hidden files do not count
    with pytest.raises(ReDiError) as info:
        list_image_folder(tiny_image_folder)
    assert str(empty) in str(info.value)


@pytest.mark.parametrize("expected", [2, 4, 1000])
def test_num_classes_mismatch(tiny_image_folder, tmp_path, expected):
    with pytest.raises(ReDiError) as info:
        list_image_folder(tiny_image_folder, num_classes=expected)
    assert str(expected) in str(info.value) and "3" in str(info.value)
    with pytest.raises(ReDiError):
        write_shards(tiny_image_folder, tmp_path / "out", SIZE, workers=0, num_classes=expected)


# --- write_shards ----------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_skipped_and_listed(tiny_image_folder, tiny_folder_layout, tmp_path, workers):
    bad = add_bad_files(tiny_image_folder)
    out = tmp_path / "shards"
    manifest = write_shards(tiny_image_folder, out, SIZE, shard_size=4, workers=workers, num_classes=3)
    skipped = {entry["path"]: entry["reason"] for entry in manifest["skipped"]}
    assert set(skipped) == {str(p) for p in bad.values()}
    assert all(reason for reason in skipped.values())
    assert manifest["num_samples"] == NUM_VALID
    assert manifest["counts_per_class"] == VALID_COUNTS
    assert manifest["classes"] == ["a", "b", "c"] and manifest["num_classes"] == 3
    assert manifest["image_size"] == SIZE
    assert manifest["stage"] == "shard"
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(manifest))

    indices, images, labels = read_all(out / "manifest.json")
    assert indices == list(range(NUM_VALID))
    sources = good_sources(tiny_image_folder, tiny_folder_layout)
    for (source, label), image, got_label in zip(sources, images, labels, strict=True):
        assert got_label == label
        with Image.open(source) as original:
            np.testing.assert_array_equal(image, adm_center_crop(original, SIZE))


@pytest.mark.parametrize("shard_size", [1, 2, 4, 6, 1000])
def test_shard_size_splits_into_contiguous_shards(tiny_image_folder, tiny_folder_layout, tmp_path,
                                                  shard_size):
    out = tmp_path / "shards"
    manifest = write_shards(tiny_image_folder, out, SIZE, shard_size=shard_size, workers=0)
    shards = manifest["shards"]
    assert len(shards) == math.ceil(NUM_VALID / shard_size)
    first = 0
    for n, shard in enumerate(shards):
        assert shard["file"] == f"shard-{n:06d}.tar"
        assert shard["first_index"] == first
        assert shard["count"] == min(shard_size, NUM_VALID - first)
        assert (out / shard["file"]).is_file()
        first += shard["count"]
    assert first == NUM_VALID
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [s["file"] for s in shards] + ["manifest.json"])  # no partial or temporary files left
    indices, _, labels = read_all(out / "manifest.json", batch_size=3)
    assert indices == list(range(NUM_VALID))
    assert labels == [label for _, label in good_sources(tiny_image_folder, tiny_folder_layout)]


def test_workers_0_and_2_give_identical_results(tiny_image_folder, tmp_path):
    add_bad_files(tiny_image_folder)
    manifests, contents = [], []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        manifest = write_shards(tiny_image_folder, out, SIZE, shard_size=2, workers=workers,
                                num_classes=3, config={"shard": {"image_size": SIZE}})
        manifest.pop("wall_time_s")
        manifests.append(manifest)
        contents.append(read_all(out / "manifest.json"))
    assert manifests[0] == manifests[1]
    assert manifests[0]["config"] == {"shard": {"image_size": SIZE}}
    assert contents[0][0] == contents[1][0] and contents[0][2] == contents[1][2]
    for a, b in zip(contents[0][1], contents[1][1], strict=True):
        np.testing.assert_array_equal(a, b)


def test_all_files_unreadable_is_an_error(tmp_path):
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"garbage")
    with pytest.raises(ReDiError, match="no readable image"):
        write_shards(root, tmp_path / "out", SIZE, workers=0)


def test_class_with_only_bad_files_counts_zero(tiny_image_folder, tmp_path):
    for f in (tiny_image_folder / "c").iterdir():
        f.write_bytes(b"broken")
    manifest = write_shards(tiny_image_folder, tmp_path / "out", SIZE, workers=0)
    assert manifest["counts_per_class"] == {**VALID_COUNTS, "c": 0}
    assert len(manifest["skipped"]) == VALID_COUNTS["c"]
    _, _, labels = read_all(tmp_path / "out" / "manifest.json")
    assert 2 not in labels


# --- iter_batches ----------------------------------------------------------------------------------

@pytest.fixture
def sharded(tiny_image_folder, tmp_path):
    out = tmp_path / "shards"
    write_shards(tiny_image_folder, out, SIZE, shard_size=2, workers=0)
    return out / "manifest.json"


@pytest.mark.parametrize("chosen", [[1, 4, 5], [0], [5], [0, 1, 2, 3, 4, 5], [2, 3]])
def test_todo_mask_yields_exactly_the_masked_in_indices(sharded, tiny_image_folder, tiny_folder_layout,
                                                        chosen):
    todo = np.zeros(NUM_VALID, dtype=bool)
    todo[chosen] = True
    indices, images, labels = read_all(sharded, batch_size=2, todo=todo)
    assert indices == chosen
    sources = good_sources(tiny_image_folder, tiny_folder_layout)
    for i, image, label in zip(indices, images, labels, strict=True):
        assert label == sources[i][1]
        with Image.open(sources[i][0]) as original:
            np.testing.assert_array_equal(image, adm_center_crop(original, SIZE))


def test_todo_mask_skips_whole_shards(sharded):
    todo = np.zeros(NUM_VALID, dtype=bool)
    todo[[1, 4]] = True  # shards 0 (0, 1) and 2 (4, 5); shard 1 (2, 3) has nothing to do
    assert [Path(p).name for p in shard_paths(sharded, todo)] == ["shard-000000.tar", "shard-000002.tar"]
    assert len(shard_paths(sharded)) == 3


def test_empty_todo_yields_nothing(sharded):
    assert list(iter_batches(sharded, 4, todo=np.zeros(NUM_VALID, dtype=bool))) == []


def test_batches_have_the_requested_size(sharded):
    sizes = [len(idx) for idx, _, _ in iter_batches(sharded, 4)]
    assert sizes == [4, 2]


def test_reading_with_workers_yields_each_sample_once(sharded):
    indices, _, labels = read_all(sharded, batch_size=2, workers=2)
    assert sorted(indices) == list(range(NUM_VALID))
    order = np.argsort(indices)
    assert [labels[i] for i in order] == [0, 0, 1, 1, 1, 2]


def test_reading_without_manifest_is_an_error(tmp_path):
    with pytest.raises(ReDiError, match="manifest not found"):
        list(iter_batches(tmp_path / "manifest.json", 4))


def test_rerun_with_fewer_shards_removes_stale_ones(tiny_image_folder, tmp_path):
    out = tmp_path / "shards"
    write_shards(tiny_image_folder, out, SIZE, shard_size=1, workers=0)
    manifest = write_shards(tiny_image_folder, out, SIZE, shard_size=NUM_VALID, workers=0)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [s["file"] for s in manifest["shards"]]
    assert len(manifest["shards"]) == 1
