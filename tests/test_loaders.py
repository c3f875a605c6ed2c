"""Loaders of official files: the ReDi PCA file (restricted unpickler) and released ReDi checkpoints."""

import argparse
import pickle
import zipfile

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from test_sample_stage import NUM_CLASSES

from redi.cli import main
from redi.errors import ReDiError
from redi.models import build_model
from redi.official_pca import load_official_pca
from redi.pca import load_pca, project
from redi.sample import load_official

DIM = 12


def official_pca_file(path, rng):
    """A file as the official calc_pca.py writes it: torch.save of {pca_model, mean, std}."""
    raw = rng.normal(size=(400, DIM)) @ rng.normal(size=(DIM, DIM)) + rng.normal(size=DIM)
    mean, std = raw.mean(0).astype(np.float32), raw.std(0).astype(np.float32)
    pca = PCA().fit((raw - mean) / std)
    torch.save({"pca_model": pca, "mean": mean, "std": std}, path)
    return raw, pca, mean, std


def test_official_pca_converts_and_projects_like_sklearn(tmp_path):
    rng = np.random.default_rng(0)
    raw, pca, mean, std = official_pca_file(tmp_path / "dino_pca_model.pth", rng)
    assert main(["convert-pca", "--official", str(tmp_path / "dino_pca_model.pth"),
                 "--out", str(tmp_path / "pca.npz")]) == 0
    ours = load_pca(tmp_path / "pca.npz")
    features = rng.normal(size=(50, DIM)) * 3
    # the official transform: standardise, subtract pca.mean_, project (sklearn's transform does the last two)
    expected = pca.transform((features - mean) / std)[:, :5]
    np.testing.assert_allclose(project(features, ours, 5), expected, atol=1e-9)
    np.testing.assert_allclose(ours["explained_variance"], pca.explained_variance_)
    manifest = (tmp_path / "manifest.json").read_text()
    assert "official ReDi PCA file" in manifest and "official_sha256" in manifest


class Boom:
    """A pickle payload whose unpickling would write a file."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_official_pca_refuses_any_other_global_and_runs_nothing(tmp_path, capsys):
    target = tmp_path / "pwned.txt"
    bad = tmp_path / "bad.pth"
    torch.save({"pca_model": Boom(str(target)), "mean": np.zeros(3), "std": np.ones(3)}, bad)
    code = main(["convert-pca", "--official", str(bad), "--out", str(tmp_path / "pca.npz")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("redi convert-pca: error:") and err.strip().count("\n") == 0
    assert "open" in err and not target.exists() and not (tmp_path / "pca.npz").exists()
    # a plain pickle (not a torch zip file) with the same payload: refused too
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps({"pca_model": Boom(str(target))}))
    with pytest.raises(ReDiError):
        load_official_pca(legacy)
    assert not target.exists()


def test_the_official_pca_file_of_the_repository_loads_when_present(tmp_path):
    """The shipped format: a zip whose data.pkl names only numpy and sklearn globals."""
    path = tmp_path / "p.pth"
    official_pca_file(path, np.random.default_rng(1))
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("data.pkl")]
        assert names
    state = load_official_pca(path)
    assert isinstance(state["pca_model"], PCA) and state["mean"].shape == (DIM,)


def test_official_redi_checkpoint_loads_with_its_training_namespace(tmp_path):
    model = build_model("S", 2, input_size=8, num_classes=NUM_CLASSES, learn_sigma=False, fusion="concat",
                        rep_channels=3, depth=2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    path = tmp_path / "0400000.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {},
                "args": argparse.Namespace(model="SiT-S/2", pca_rank=3)}, path)
    # a 2-block S model: the loader builds S's 12 blocks, so the strict load names the mismatch
    with pytest.raises(ReDiError, match="does not fit SiT-S/2"):
        load_official(path, "SiT-S/2")
    full = build_model("S", 2, input_size=8, num_classes=NUM_CLASSES, learn_sigma=False, fusion="concat",
                       rep_channels=3)
    torch.save({"ema": full.state_dict(), "args": argparse.Namespace(pca_rank=3)}, path)
    sm = load_official(path, "SiT-S/2")
    assert sm.model.fusion == "concat" and sm.model.rep_channels == 3 and not sm.model.learn_sigma
    assert sm.objective == "interpolant" and sm.num_classes == NUM_CLASSES
