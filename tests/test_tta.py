"""Test-time averaging (`geoir tile --tta`): every tile encoded as the mean features of its 8 flips and
quarter turns, recorded in the bundle so that later scenes and queries are encoded alike."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner, Result
from PIL import Image

from geoir.cli import cli
from geoir.encoding.backbone import load_backbone
from geoir.encoding.model import load_model, model_for_bundle
from geoir.index.bundle import Bundle
from geoir.io.scene import open_scene
from geoir.retrieval.engine import Searcher
from geoir.tiling.grid import TilingParams
from geoir.tiling.tiler import TileSource
from geoir.training.data import dihedral
from tests.conftest import MakeGeoTiff

TEST = ["--backbone", "test", "--device", "cpu", "--workers", "0"]


def geoir(*args: str) -> Result:
    return CliRunner().invoke(cli, ["-q", *args])


def test_tta_features_are_the_mean_of_the_eight_views_and_turn_invariant() -> None:
    bb = load_backbone("test", device="cpu")
    img = np.random.default_rng(0).integers(0, 256, (3, 3, 64, 48), dtype=np.uint8)  # not square: queries
    views = [bb.features(torch.from_numpy(np.stack([dihedral(i, v) for i in img]))) for v in range(8)]
    bb.tta = True
    got = bb.features(torch.from_numpy(img))
    assert got.shape == (3, bb.num_features)
    torch.testing.assert_close(got, torch.stack(views).mean(0), rtol=1e-4, atol=1e-5)
    turned = np.ascontiguousarray(np.rot90(img, 1, axes=(2, 3))[:, :, :, ::-1])
    torch.testing.assert_close(bb.features(torch.from_numpy(turned)), got, rtol=1e-4, atol=1e-5)
    # Without averaging a turned tile gets other features: the test above can fail.
    bb.tta = False
    assert not torch.allclose(bb.features(torch.from_numpy(turned)), bb.features(torch.from_numpy(img)), atol=1e-3)


def test_tta_is_part_of_the_model_fingerprint() -> None:
    plain, averaged = load_model("backbone", backbone="test"), load_model("backbone", backbone="test", tta=True)
    assert plain.fingerprint != averaged.fingerprint and averaged.describe()["backbone_tta"] is True
    assert plain.backbone.fingerprint == averaged.backbone.fingerprint  # the same weights
    # A bundle's record brings it back; an explicit choice wins.
    assert model_for_bundle(averaged.describe(), backbone="test").fingerprint == averaged.fingerprint
    assert model_for_bundle(None, backbone="test").backbone.tta is False


def test_tile_tta_records_it_and_later_scenes_and_queries_follow(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    index = tmp_path / "idx"
    a, b = make_geotiff(name="a.tif", seed=1), make_geotiff(name="b.tif", seed=2)
    assert geoir("tile", str(a), "--index", str(index), "--model", "backbone", "--tta", *TEST).exit_code == 0
    model = json.loads((index / "manifest.json").read_text())["model"]
    assert model["backbone_tta"] is True
    assert "averaged over 8 turns (--tta)" in geoir("info", "--index", str(index)).output
    # A second scene without --tta is encoded as the bundle was, not refused as another model.
    r = geoir("tile", str(b), "--index", str(index), "--backbone", "test", "--workers", "0")
    assert r.exit_code == 0, r.output
    bundle = Bundle.open(index)
    assert bundle.manifest["counts"]["scenes"] == 2 and bundle.model["fingerprint"] == model["fingerprint"]
    # The stored vectors are the averaged ones: a tile turned a quarter finds itself first.
    tiles = bundle.tiles()
    source = TileSource(open_scene(a), TilingParams())
    rgb = source.read(0).rgb
    query = tmp_path / "q.png"
    Image.fromarray(np.rot90(rgb, 1, axes=(1, 2)).transpose(1, 2, 0).copy()).save(query)
    out = tmp_path / "hits.geojson"
    r = geoir("search", str(query), "--index", str(index), "--out", str(out), "-k", "1", "--no-rotations")
    assert r.exit_code == 0, r.output
    hit = json.loads(out.read_text())["features"][0]["properties"]
    assert int(hit["tile_id"]) == int(source.tiles[0].id) and len(tiles) == 8
    # The averaged query is the same in every turn, so the default search encodes it once, to the same hit.
    searcher = Searcher(bundle, model_for_bundle(bundle.model, backbone="test"))
    assert searcher.rotations is False
    r = geoir("search", str(query), "--index", str(index), "--out", str(out), "-k", "1", "--overwrite")
    assert int(json.loads(out.read_text())["features"][0]["properties"]["tile_id"]) == int(source.tiles[0].id)


def test_tta_on_a_bundle_encoded_without_it_is_refused(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    index = tmp_path / "idx"
    assert geoir("tile", str(make_geotiff()), "--index", str(index), "--model", "backbone", *TEST).exit_code == 0
    before = (index / "manifest.json").read_text()
    r = geoir("tile", str(make_geotiff(name="b.tif", seed=3)), "--index", str(index), "--tta", *TEST)
    assert r.exit_code == 2 and "encoded without --tta" in r.output and "Traceback" not in r.output
    assert (index / "manifest.json").read_text() == before
    r = geoir("tile", str(make_geotiff()), "--index", str(tmp_path / "n"), "--tta", "--no-encode")
    assert r.exit_code == 2 and "--no-encode" in r.output and not (tmp_path / "n").exists()


def test_encode_tta_images_match_an_averaged_bundle_and_no_encode_bundles_can_take_it(
    make_geotiff: MakeGeoTiff, tmp_path: Path
) -> None:
    scene = make_geotiff(seed=4)
    averaged, later = tmp_path / "averaged", tmp_path / "later"
    assert geoir("tile", str(scene), "--index", str(averaged), "--model", "backbone", "--tta", *TEST).exit_code == 0
    # A bundle tiled without encoding takes --tta from `geoir encode`, and stores what `geoir tile --tta` stores.
    assert geoir("tile", str(scene), "--index", str(later), "--no-encode", "--workers", "0").exit_code == 0
    r = geoir("encode", "--index", str(later), "--model", "backbone", "--tta", *TEST)
    assert r.exit_code == 0, r.output
    a, b = Bundle.open(averaged), Bundle.open(later)
    assert b.model is not None and b.model["backbone_tta"] is True and b.model["fingerprint"] == a.model["fingerprint"]
    np.testing.assert_allclose(b.vectors()["embedding"], a.vectors()["embedding"], rtol=1e-5, atol=1e-6)
    # An image encoded with --tta gets its tile's stored vector, whichever way it is turned; without, it does not.
    rgb = TileSource(open_scene(scene), TilingParams()).read(0).rgb
    png = tmp_path / "turned.png"
    Image.fromarray(np.rot90(rgb, 3, axes=(1, 2)).transpose(1, 2, 0).copy()).save(png)
    stored = a.vectors()["embedding"][0]
    for flag, close in (("--tta", True), ("", False)):
        out = tmp_path / f"v{flag}.npy"
        r = geoir("encode", str(png), "--out", str(out), "--model", "backbone", *TEST[:4], *([flag] if flag else []))
        assert r.exit_code == 0, r.output
        assert np.allclose(np.load(out)[0], stored, rtol=1e-4, atol=1e-5) is close
    # A bundle encoded without averaging refuses it, and is left as it was.
    plain = tmp_path / "plain"
    assert geoir("tile", str(scene), "--index", str(plain), "--model", "backbone", *TEST).exit_code == 0
    before = (plain / "manifest.json").read_text()
    r = geoir("encode", "--index", str(plain), "--tta", *TEST)
    assert r.exit_code == 2 and "encoded without --tta" in r.output
    assert (plain / "manifest.json").read_text() == before


def test_python_api_takes_tta_and_refuses_contradictions(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    import pytest

    import geoir
    from geoir.errors import ModelError

    averaged = load_model("backbone", backbone="test", tta=True)
    scene = make_geotiff(seed=5)
    index, plain = tmp_path / "idx", tmp_path / "plain"
    geoir.tile([scene], index=index, model=averaged)
    assert Bundle.open(index).model["backbone_tta"] is True
    with pytest.raises(ModelError, match=r"tta=True; load it with load_model\(\.\.\., tta=False\)"):
        geoir.tile([scene], index=tmp_path / "other", model=averaged, tta=False)
    assert not (tmp_path / "other").exists()
    geoir.tile([scene], index=plain, model=load_model("backbone", backbone="test"))
    with pytest.raises(ModelError, match="encoded without tta"):
        geoir.tile([make_geotiff(name="b.tif", seed=6)], index=plain, model="backbone", tta=True)
    assert Bundle.open(plain).manifest["counts"]["scenes"] == 1
    # A loaded model that contradicts the bundle's averaging is named as such, not as "another model".
    with pytest.raises(ModelError, match=r"idx was encoded with tta .*encode with it too"):
        geoir.tile([make_geotiff(name="c.tif", seed=7)], index=index, model=load_model("backbone", backbone="test"))
    with pytest.raises(ModelError, match=r"idx was encoded with tta"):
        geoir.search(np.zeros((3, 32, 32), np.uint8), index=index, model=load_model("backbone", backbone="test"))
    # Images: the averaged embedding is the same however the image is turned.
    rgb = np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    pngs = [tmp_path / "a.png", tmp_path / "b.png"]
    Image.fromarray(rgb).save(pngs[0])
    Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1)[:, ::-1])).save(pngs[1])
    emb = geoir.encode_images(pngs, model=averaged)
    np.testing.assert_allclose(emb[0], emb[1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ModelError):
        geoir.encode_images(pngs, model=averaged, tta=False)
