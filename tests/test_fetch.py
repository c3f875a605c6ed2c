"""`redi fetch`: published files downloaded atomically, or a one-line error saying where to put them."""

import pytest

from redi.cli import main
from redi.errors import ReDiError
from redi.fetch import fetch


def test_a_url_is_downloaded_atomically(tmp_path):
    source = tmp_path / "published.npz"
    source.write_bytes(bytes(range(256)) * 1000)
    out = tmp_path / "deep" / "ref.npz"
    done = fetch(source.as_uri(), out)
    assert out.read_bytes() == source.read_bytes() and done["bytes"] == 256_000
    assert [p.name for p in out.parent.iterdir()] == ["ref.npz"]  # no temporary file left


def test_a_failed_download_leaves_nothing_and_says_where_to_put_the_file(tmp_path, capsys):
    out = tmp_path / "ref.npz"
    with pytest.raises(ReDiError, match=f"download it by hand to {out}"):
        fetch((tmp_path / "missing.npz").as_uri(), out)
    assert not out.exists() and not list(tmp_path.iterdir())
    code = main(["fetch", "--source", "hf://zelaki/SiT-ReDi-XL-2", "--out", str(out)])  # HF_HUB_OFFLINE=1
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("redi fetch: error: could not fetch hf://zelaki/SiT-ReDi-XL-2")
    assert err.strip().count("\n") == 0 and not out.exists()


def test_a_malformed_hub_source_is_named(tmp_path):
    with pytest.raises(ReDiError, match="expected hf://<owner>/<repo>"):
        fetch("hf://justone", tmp_path / "x.pt")
