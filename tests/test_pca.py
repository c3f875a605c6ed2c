"""redi.pca: streaming standardised PCA against sklearn's PCA on StandardScaler output."""

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from redi.pca import MomentAccumulator, fit_pca, load_pca, project, save_pca

DIM = 16


def correlated_data(n: int = 2000, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """Correlated channels with very different scales and offsets."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, dim)) * np.linspace(3.0, 0.2, dim)
    mix = rng.standard_normal((dim, dim))
    scales = 10.0 ** rng.uniform(-2, 3, dim)
    offsets = rng.uniform(-50, 50, dim)
    return (latent @ mix) * scales + offsets


def uneven_chunks(x: np.ndarray, bounds=(0, 7, 300, 301, 1100, 1999)) -> list[np.ndarray]:
    edges = [*bounds, len(x)]
    return [x[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)]


def sklearn_reference(x: np.ndarray) -> PCA:
    return PCA().fit(StandardScaler().fit_transform(x))


def align_signs(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """`theirs` with each row's sign flipped to agree with the matching row of `ours`."""
    signs = np.sign(np.sum(ours * theirs, axis=1))
    assert np.all(signs != 0)
    return theirs * signs[:, None]


def assert_matches_sklearn(pca: dict, x: np.ndarray, rtol: float = 1e-6) -> None:
    ref = sklearn_reference(x)
    theirs = align_signs(pca["components"], ref.components_)
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(pca["components"], theirs, rtol=0, atol=rtol * scale)
    np.testing.assert_allclose(pca["explained_variance"], ref.explained_variance_, rtol=rtol)
    np.testing.assert_allclose(pca["explained_variance_ratio"], ref.explained_variance_ratio_, rtol=rtol)


def test_fit_pca_matches_sklearn():
    x = correlated_data()
    pca = fit_pca(uneven_chunks(x), DIM)
    assert pca["components"].shape == (DIM, DIM)
    assert int(pca["num_vectors"]) == len(x)
    assert_matches_sklearn(pca, x)
    np.testing.assert_allclose(pca["mean"], x.mean(axis=0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(pca["std"], x.std(axis=0), rtol=1e-10)
    np.testing.assert_allclose(pca["explained_variance_ratio"].sum(), 1.0, rtol=1e-12)
    assert np.all(np.diff(pca["explained_variance"]) <= 0)
    # orthonormal rows
    np.testing.assert_allclose(pca["components"] @ pca["components"].T, np.eye(DIM), atol=1e-10)


def test_sign_convention_largest_entry_positive():
    pca = fit_pca(uneven_chunks(correlated_data(seed=3)), DIM)
    comps = pca["components"]
    largest = comps[np.arange(DIM), np.abs(comps).argmax(axis=1)]
    assert np.all(largest > 0)


def test_chunking_invariance():
    x = correlated_data(seed=1)
    one = fit_pca([x], DIM)
    many = fit_pca(uneven_chunks(x), DIM)
    rows = fit_pca((row[None] for row in x[:500]), DIM)
    rows_ref = fit_pca([x[:500]], DIM)
    for key in ("mean", "std", "components", "explained_variance", "explained_variance_ratio"):
        np.testing.assert_allclose(many[key], one[key], rtol=1e-10, atol=1e-10, err_msg=key)
        np.testing.assert_allclose(rows[key], rows_ref[key], rtol=1e-10, atol=1e-10, err_msg=key)


def test_large_offset_still_matches_sklearn():
    """A naive sum-of-squares in float64 loses ~8 digits at offset 1e4 with tiny-scale channels."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2000, DIM)) @ rng.standard_normal((DIM, DIM)) * 1e-2 + 1e4
    pca = fit_pca(uneven_chunks(x), DIM)
    assert_matches_sklearn(pca, x)
    np.testing.assert_allclose(pca["std"], x.std(axis=0), rtol=1e-8)
    np.testing.assert_allclose(pca["mean"], x.mean(axis=0), rtol=1e-12)
    # the earlier offset-free data shifted too
    base = correlated_data(seed=4)
    assert_matches_sklearn(fit_pca(uneven_chunks(base + 1e4), DIM), base + 1e4)


def test_constant_channel_gives_no_nan():
    x = correlated_data(seed=5)
    x[:, 3] = 7.25
    pca = fit_pca(uneven_chunks(x), DIM)
    for key, value in pca.items():
        assert np.all(np.isfinite(value)), key
    assert pca["std"][3] == 1.0
    assert pca["mean"][3] == pytest.approx(7.25)
    assert pca["explained_variance"][-1] == pytest.approx(0.0, abs=1e-10)
    # the constant channel carries no weight in any component with non-zero variance
    np.testing.assert_allclose(pca["components"][:-1, 3], 0.0, atol=1e-8)
    z = project(x, pca, DIM)
    assert np.all(np.isfinite(z))
    ref = sklearn_reference(x)
    np.testing.assert_allclose(pca["explained_variance"][:-1], ref.explained_variance_[:-1], rtol=1e-6)


@pytest.mark.parametrize("rank", [1, 4, DIM])
def test_project_matches_sklearn_transform(rank):
    x = correlated_data(seed=6)
    pca = fit_pca(uneven_chunks(x), DIM)
    ref = sklearn_reference(x)
    ours = project(x, pca, rank)
    assert ours.shape == (len(x), rank)
    theirs = ref.transform(StandardScaler().fit_transform(x))[:, :rank]
    signs = np.sign(np.sum(pca["components"][:rank] * ref.components_[:rank], axis=1))
    np.testing.assert_allclose(ours, theirs * signs, rtol=0, atol=1e-6 * np.abs(theirs).max())
    # (..., D) input keeps its leading shape
    grid = project(x[:24].reshape(2, 12, DIM), pca, rank)
    np.testing.assert_allclose(grid.reshape(24, rank), ours[:24], rtol=1e-12, atol=1e-12)


def test_save_load_round_trip(tmp_path):
    pca = fit_pca(uneven_chunks(correlated_data(seed=7)), DIM)
    path = tmp_path / "sub" / "pca.npz"
    save_pca(path, pca)
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["pca.npz"]  # no temp file left behind
    loaded = load_pca(path)
    assert set(loaded) == set(pca)
    for key in pca:
        assert loaded[key].dtype == np.asarray(pca[key]).dtype, key
        np.testing.assert_array_equal(loaded[key], pca[key], err_msg=key)


def test_empty_chunks_are_ignored():
    """An empty chunk (e.g. an empty features block) must not poison the float64 shift with NaN."""
    x = correlated_data(seed=10)
    empty = np.zeros((0, DIM))
    ref = fit_pca([x[:1000], x[1000:]], DIM)
    got = fit_pca([empty, x[:1000], empty, x[1000:]], DIM)
    for key in ("mean", "std", "components", "explained_variance", "explained_variance_ratio"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-10, atol=1e-10, err_msg=key)
    assert int(got["num_vectors"]) == len(x)


@pytest.mark.parametrize("chunks", [[], [np.zeros((0, DIM))], [np.ones((1, DIM))]])
def test_fewer_than_two_vectors_raises(chunks):
    with pytest.raises(ValueError, match="at least two"):
        fit_pca(chunks, DIM)


def test_moment_accumulator_state_is_o_d_squared():
    rng = np.random.default_rng(8)
    dim = 12

    def state_sizes(acc):
        return sorted(v.size for v in vars(acc).values() if isinstance(v, np.ndarray))

    small, large = MomentAccumulator(dim), MomentAccumulator(dim)
    small.update(rng.standard_normal((3, dim)))
    for _ in range(20):
        large.update(rng.standard_normal((500, dim)))
    for acc in (small, large):
        sizes = state_sizes(acc)
        assert max(sizes) == dim * dim
        assert sum(sizes) <= dim * dim + 2 * dim
        assert all(s in (dim, dim * dim) for s in sizes)
        nbytes = sum(v.nbytes for v in vars(acc).values() if isinstance(v, np.ndarray))
        assert nbytes <= 8 * (dim * dim + 2 * dim)
    assert state_sizes(small) == state_sizes(large)
    assert large.n == 10_000 and small.n == 3


def test_moment_accumulator_mean_and_covariance():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((300, 5)) * [1, 10, 100, 0.1, 1] + 5e3
    acc = MomentAccumulator(5)
    acc.update(x[:100])
    acc.update(x[100:])
    mean, cov = acc.mean_and_covariance()
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
