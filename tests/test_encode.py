"""The encoding pipeline: batch-size and worker independence, dtypes and band layouts, model files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from geoir.cli import cli
from geoir.encoding.batches import iter_batches
from geoir.encoding.model import Model, load_model, model_for_bundle
from geoir.errors import ModelError
from geoir.index.bundle import Bundle
from geoir.io.scene import open_scene
from geoir.tiling.grid import TilingParams
from geoir.tiling.tiler import TileSource
from geoir.training.recipes import Recipe
from tests.conftest import MakeGeoTiff


@pytest.fixture(scope="module")
def test_model() -> Model:
    return load_model("backbone", backbone="test")


def encode_all(model: Model, source: TileSource, batch_size: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    idx, emb = [], []
    for b in iter_batches(source, batch_size, workers):
        idx.append(b.indexes)
        emb.append(model.encode(torch.from_numpy(b.rgb)).embedding)
    return np.concatenate(idx), np.concatenate(emb)


def test_same_vectors_whatever_batch_size_and_workers(test_model: Model, make_geotiff: MakeGeoTiff) -> None:
    source = TileSource(open_scene(make_geotiff(shape=(3, 768, 768))), TilingParams())
    i1, e1 = encode_all(test_model, source, 1, 0)
    i7, e7 = encode_all(test_model, source, 7, 0)
    iw, ew = encode_all(test_model, source, 4, 1)
    assert i1.tolist() == i7.tolist() == iw.tolist() == list(range(9))
    assert np.abs(e1 - e7).max() < 1e-5 and np.abs(e1 - ew).max() < 1e-5


def test_image_files_are_encoded_in_batches_of_one_size_in_their_order(
    test_model: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `geoir encode IMAGE...` took --batch-size and --workers and used neither: one image per backbone pass.
    rng = np.random.default_rng(0)
    shapes = [(64, 64), (64, 64), (64, 64), (80, 48), (64, 64), (64, 64)]
    paths = []
    for i, (h, w) in enumerate(shapes):
        paths.append(tmp_path / f"i{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    batches: list[int] = []
    encode = Model.encode
    monkeypatch.setattr(Model, "encode", lambda self, x: batches.append(len(x)) or encode(self, x))
    one = np.load(_encode_cli(tmp_path / "one.npy", paths, "--batch-size", "1"))
    assert batches == [1] * 6
    batches.clear()
    two = np.load(_encode_cli(tmp_path / "two.npy", paths, "--batch-size", "2"))
    assert batches == [2, 1, 1, 2]  # a new size starts a batch
    assert np.abs(one - two).max() < 1e-5
    batches.clear()
    import geoir

    assert np.abs(geoir.encode_images(paths, test_model, batch_size=64) - one).max() < 1e-5
    assert batches == [3, 1, 2]
    r = CliRunner().invoke(cli, ["encode", *map(str, paths), "--out", str(tmp_path / "w.npy"), "--workers", "2",
                                 "--model", "backbone", "--backbone", "test"])  # fmt: skip
    assert r.exit_code == 2 and "IMAGE files are read here, one by one: leave it out" in r.output
    with pytest.raises(ModelError, match="batch_size must be a positive number of images"):
        geoir.encode_images(paths, test_model, batch_size=0)


def _encode_cli(out: Path, paths: list[Path], *args: str) -> Path:
    r = CliRunner().invoke(
        cli, ["-q", "encode", *map(str, paths), "--out", str(out), "--model", "backbone", "--backbone", "test", *args]
    )
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.filterwarnings("ignore:.*pin_memory:UserWarning")  # without a GPU torch pins nothing, and says so
def test_feeding_a_gpu_leaves_the_callers_torch_threads_as_they_were(make_geotiff: MakeGeoTiff) -> None:
    # Reader processes feeding a GPU (pin_memory) take the process down to 2 torch threads while they run; a
    # notebook's later CPU work must get its threads back, after a whole scene and after one stopped early.
    source = TileSource(open_scene(make_geotiff(shape=(3, 512, 512))), TilingParams())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        batches = iter_batches(source, 1, workers=1, pin_memory=True)
        next(batches)
        assert torch.get_num_threads() == 2
        batches.close()
        assert torch.get_num_threads() == 3
        assert len(list(iter_batches(source, 2, workers=1, pin_memory=True))) == 2
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("shape", "dtype", "nodata"),
    [
        ((3, 300, 300), "uint16", 0),
        ((1, 300, 300), "uint8", None),
        ((4, 300, 300), "uint16", None),
        ((3, 300, 300), "float32", None),
        ((2, 300, 300), "int16", None),
    ],
)
def test_dtypes_and_bands_encode(
    test_model: Model, make_geotiff: MakeGeoTiff, shape: tuple, dtype: str, nodata: float | None
) -> None:
    scene = open_scene(make_geotiff(shape=shape, dtype=dtype, nodata=nodata))
    source = TileSource(scene, TilingParams())
    idx, emb = encode_all(test_model, source, 4, 0)
    assert len(idx) == 4 and np.isfinite(emb).all()
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_model_file_round_trip(tmp_path: Path, test_model: Model) -> None:
    from geoir.training.heads import HashHead

    head = HashHead(test_model.backbone.num_features, bits=16)
    model = Model(test_model.backbone, head, head.config(), {"name": "t"})
    path = tmp_path / "m.pt"
    model.save(path)
    again = load_model(path)
    assert again.fingerprint == model.fingerprint and again.bits == 16
    x = torch.randint(0, 255, (3, 3, 64, 64), dtype=torch.uint8)
    a, b = model.encode(x), again.encode(x)
    assert np.array_equal(a.codes, b.codes) and a.codes.shape == (3, 2)
    # Codes are the sign of u with sign(0) = +1, packed MSB first.
    assert np.array_equal(np.unpackbits(a.codes, axis=1).astype(bool), a.u >= 0)


def test_model_file_records_the_taps(tmp_path: Path) -> None:
    from geoir.training.heads import HashHead

    tapped = load_model("backbone", backbone="test", taps=(1,)).backbone
    head = HashHead(tapped.num_features, bits=16)
    path = tmp_path / "m.pt"
    Model(tapped, head, head.config(), {"name": "t"}).save(path)
    again = load_model(path)
    assert again.backbone.taps == (1,) and again.backbone.fingerprint == tapped.fingerprint
    # A model file written before taps existed has none, and its backbone fingerprint is what it was.
    payload = torch.load(path, weights_only=True)
    bare = load_model("backbone", backbone="test").backbone
    head = HashHead(bare.num_features, bits=16)
    payload.update(
        backbone={k: v for k, v in payload["backbone"].items() if k != "taps"} | {"fingerprint": bare.fingerprint},
        head_config=head.config(),
        head_state=head.state_dict(),
    )
    torch.save(payload, path)
    assert load_model(path).backbone.taps == ()
    # A bundle of bare-backbone vectors is reopened with the taps it was written with (none before taps).
    described = Model(tapped).describe() | {"name": "backbone"}
    assert model_for_bundle(described).backbone.fingerprint == tapped.fingerprint
    described.pop("backbone_taps")
    assert model_for_bundle(described).backbone.taps == ()


def test_model_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not a readable geoir model"):
        load_model(junk)
    with pytest.raises(ModelError, match="unknown timm model"):
        load_model("backbone", backbone="no_such_model_xyz")
    # A head trained on features of another width (a damaged feature cache gave one) is not written, and a
    # file holding one is refused on load, not at its first matrix product.
    from geoir.training.heads import HashHead

    backbone = load_model("backbone", backbone="test").backbone
    narrow = HashHead(10, bits=16)
    with pytest.raises(ModelError, match="the head takes 10 features, but test_efficientnet gives 256"):
        Model(backbone, narrow, narrow.config()).save(tmp_path / "narrow.pt")
    assert not (tmp_path / "narrow.pt").exists()
    wide = HashHead(backbone.num_features, bits=16)
    Model(backbone, wide, wide.config()).save(tmp_path / "edited.pt")
    payload = torch.load(tmp_path / "edited.pt", weights_only=False)
    payload["head_config"]["in_dim"], payload["head_state"] = 10, narrow.state_dict()
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(ModelError, match=r"edited\.pt: its head takes 10 features, but its backbone .* gives 256"):
        load_model(tmp_path / "edited.pt").encode(torch.zeros((1, 3, 64, 64), dtype=torch.uint8))


def test_shipped_default_model_is_the_documented_recipe() -> None:
    # docs/training.md's command: combined, 64 bits, both heads on the dihedral views, gated retention,
    # similarity distillation at its default weight.
    model = load_model(None)
    recipe = model.meta["recipe"]
    assert recipe["method"] == "combined" and recipe["bits"] == 64
    assert recipe["augment"] == "dihedral" and recipe["retain_gate"] and recipe["retain_dim"] == 256
    assert recipe["distill"] == Recipe().distill == 10.0
    srl = model.head.srl  # type: ignore[union-attr]
    assert srl.gate is not None and srl.gate_centroids.shape == (21, srl.out_dim)
    lo, hi, tau, _ = srl.gate
    assert 0 <= lo <= hi <= np.pi / 2 and 0 < tau < 1
    x = torch.randint(0, 255, (2, 3, 256, 256), dtype=torch.uint8)
    out = model.encode(x)
    assert out.embedding.shape == (2, srl.embedding_dim) and out.codes.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(out.embedding, axis=1), 1.0, atol=1e-5)


def test_model_file_with_a_broken_head_names_the_file(tmp_path: Path) -> None:
    payload = torch.load(load_model(None).meta["path"], map_location="cpu", weights_only=True)
    payload["head_config"]["gate"] = [0.1, 1.0]  # a gate needs 4 numbers
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(ModelError, match=r"bad\.pt: a retention gate needs .*geoir train"):
        load_model(bad)


def test_a_model_files_backbone_on_demand_waits_for_pixels(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    """Searches by tile, point or example polygon run the head on stored features: the backbone (timm and its
    weights, most of a search's start-up) is created only when pixels are encoded, and answers for the model
    as the file records it until then."""
    import subprocess
    import sys

    from geoir.encoding.backbone import DeferredBackbone

    eager = load_model("default")
    lazy = load_model("default", backbone_on_demand=True)
    assert isinstance(lazy.backbone, DeferredBackbone) and not lazy.backbone.loaded
    assert lazy.fingerprint == eager.fingerprint and lazy.describe() == eager.describe()
    feats = torch.randn(3, eager.backbone.num_features)
    a, b = eager.encode_features(feats), lazy.encode_features(feats)
    assert np.array_equal(a.embedding, b.embedding) and np.array_equal(a.codes, b.codes)
    assert not lazy.backbone.loaded
    rgb = np.random.default_rng(0).integers(0, 255, (2, 3, 96, 96), dtype=np.uint8)
    a, b = eager.encode(torch.from_numpy(rgb)), lazy.encode(torch.from_numpy(rgb))
    assert lazy.backbone.loaded and np.allclose(a.embedding, b.embedding, atol=1e-6)
    # Through the CLI, in a fresh process: a search by tile never imports timm; one by image does.
    index = tmp_path / "idx"
    scene = make_geotiff(shape=(3, 512, 512))
    assert CliRunner().invoke(cli, ["-q", "tile", str(scene), "--index", str(index), "--device", "cpu"]).exit_code == 0
    tid = int(Bundle.open(index).tiles().tile_id[0])
    png = tmp_path / "q.png"
    Image.fromarray(rgb[0].transpose(1, 2, 0)).save(png)
    for query, imports_timm in ((f"tile:{tid}", False), (str(png), True)):
        code = (
            "import sys; from geoir.cli import cli\n"
            f"cli(['-q', 'search', {query!r}, '--index', {str(index)!r}, '--out', {str(tmp_path / 'h.gpkg')!r},"
            " '--overwrite', '--device', 'cpu'], standalone_mode=False)\n"
            "print('timm' in sys.modules)"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and r.stdout.strip() == str(imports_timm), (query, r.stdout, r.stderr)
