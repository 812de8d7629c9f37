"""The examples run as documented (on the tiny test model where the default would be slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import geoir
from geoir.encoding.model import load_model
from tests.conftest import MakeGeoTiff


def test_python_api_round_trip(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    model = load_model("backbone", backbone="test")
    scene = make_geotiff(shape=(3, 700, 700))
    index = tmp_path / "idx"
    report = geoir.tile([scene], index=index, model=model)
    assert report.tiles_added == 9
    patch = np.random.default_rng(0).integers(0, 255, (3, 256, 256), dtype=np.uint8)
    hits = geoir.search(patch, index=index, k=4, model=model).hits
    assert hits["rank"].tolist() == [1, 2, 3, 4] and hits.crs.to_epsg() == 4326
    tid = int(hits.tile_id.iloc[0])
    again = geoir.search(tid, index=index, k=3, model=model).hits
    assert tid not in again.tile_id.tolist()
    png = tmp_path / "q.png"
    from PIL import Image

    Image.fromarray(np.moveaxis(patch, 0, -1)).save(png)
    emb = geoir.encode_images([png, png], model=model)
    assert emb.shape == (2, 256) and np.allclose(emb[0], emb[1])
    # The same pixels through a file or an array give the same query.
    from_file = geoir.search(png, index=index, k=4, model=model).hits
    assert from_file.tile_id.tolist() == hits.tile_id.tolist()


def test_python_api_takes_single_paths_numpy_ids_and_checks_its_arguments(
    make_geotiff: MakeGeoTiff, tmp_path: Path
) -> None:
    from geoir.errors import ModelError, QueryError, TilingError

    model = load_model("backbone", backbone="test")
    scene = make_geotiff(shape=(3, 512, 512))
    index = tmp_path / "idx"
    # One path, not in a list (a str is a sequence of characters): that one scene.
    assert geoir.tile(str(scene), index=index, model=model).tiles_added == 4
    tid = geoir.search(np.zeros((3, 64, 64), np.uint8), index=index, k=2, model=model).hits.tile_id.iloc[0]
    assert isinstance(tid, np.integer)  # what a hits frame gives back is a query too
    hits = geoir.search(tid, index=index, k=2, model=model, negatives=np.full((3, 64, 64), 255, np.uint8)).hits
    assert len(hits) == 2 and tid not in hits.tile_id.tolist()
    for kwargs, message in (({"k": 0}, "k must be a positive"), ({"bbox": (10, 0, 5, 1)}, "west < east")):
        with pytest.raises(QueryError, match=message):
            geoir.search(tid, index=index, model=model, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="tta is a way of encoding"):
        geoir.tile(str(scene), index=tmp_path / "x", encode=False, tta=True)
    # A run that gives no tile leaves no bundle behind, as `geoir tile` does.
    small = make_geotiff("small.tif", shape=(3, 100, 100))
    with pytest.raises(TilingError, match=r"no tile of small\.tif passed the nodata limit"):
        geoir.tile([small], index=tmp_path / "empty", model=model)
    assert not (tmp_path / "empty").exists()
    assert geoir.Hits.__name__ == "Hits" and geoir.Model.__name__ == "Model"
    # Arguments of the wrong shape are named, as GeoirErrors, before any work.
    bad_search = (
        ({"query": None}, "no query given"),
        ({"query": np.zeros((64, 64), np.uint8)}, r"uint8 RGB of shape \(3, H, W\), got uint8 \(64, 64\)"),
        ({"query": np.zeros((3, 0, 0), np.uint8)}, "uint8 RGB of shape"),
        ({"query": np.zeros((3, 8, 8), np.float32)}, "got float32"),
        ({"query": tid, "bbox": (1, 2, 3)}, "give 4 numbers"),
    )
    for kwargs, message in bad_search:
        with pytest.raises(QueryError, match=message):
            geoir.search(index=index, model=model, **kwargs)  # type: ignore[arg-type]
    for kwargs, message in (
        ({"batch_size": 0}, "batch_size"),
        ({"workers": -1}, "workers"),
        ({"scenes": []}, "no scenes"),
    ):
        with pytest.raises(TilingError, match=message):
            geoir.tile(**{"scenes": str(scene), **kwargs}, index=tmp_path / "y", model=model)  # type: ignore[arg-type]
    assert not (tmp_path / "y").exists()
    png = tmp_path / "q.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
    assert geoir.encode_images(str(png), model=model).shape[0] == 1  # one path alone, not its characters


def test_lazy_api_attribute() -> None:
    assert callable(geoir.tile) and callable(geoir.search)
    with pytest.raises(AttributeError):
        geoir.nope  # noqa: B018


def test_demo_rebuilds_its_own_index_when_another_release_built_it(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("demo", Path(__file__).parents[1] / "examples" / "demo.py")
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    index = tmp_path / "idx"
    demo.drop_stale_index(index)  # none yet: nothing to do
    geoir.tile([make_geotiff(shape=(3, 300, 300))], index=index, model=load_model("backbone", backbone="test"))
    manifest = json.loads((index / "manifest.json").read_text())
    manifest["model"]["fingerprint"] = load_model(None).fingerprint  # as if this release's default built it
    (index / "manifest.json").write_text(json.dumps(manifest))
    demo.drop_stale_index(index)
    assert (index / "manifest.json").exists()
    manifest["model"]["fingerprint"] = "0" * 64  # another release's default
    (index / "manifest.json").write_text(json.dumps(manifest))
    demo.drop_stale_index(index)
    assert not index.exists()
