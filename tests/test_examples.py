"""The examples run as documented (on the tiny test model where the default would be slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import geoir
from geoir.encoding.model import load_model
from tests.conftest import REPO, MakeGeoTiff, needs_repo_file


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
    from geoir.errors import GeoirError, ModelError, QueryError, TilingError
    from geoir.tiling.grid import TilingParams

    model = load_model("backbone", backbone="test")
    scene = make_geotiff(shape=(3, 512, 512))
    index = tmp_path / "idx"
    # One path, not in a list (a str is a sequence of characters): that one scene.
    assert geoir.tile(str(scene), index=index, model=model).tiles_added == 4
    tid = geoir.search(np.zeros((3, 64, 64), np.uint8), index=index, k=2, model=model).hits.tile_id.iloc[0]
    assert isinstance(tid, np.integer)  # what a hits frame gives back is a query too
    hits = geoir.search(tid, index=index, k=2, model=model, negatives=np.full((3, 64, 64), 255, np.uint8)).hits
    assert len(hits) == 2 and tid not in hits.tile_id.tolist()
    for kwargs, message in (({"k": 0}, "k must be a positive"), ({"bbox": (10, 0, 5, 1)}, "355 degrees wide; swap")):
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
    bad_search += (
        ({"query": 3.5}, "3.5 is not a query"),
        ({"query": b"q.png"}, "is not a query"),
        ({"query": "tile:abc"}, "a tile id is tile:ID"),
        ({"query": tid, "negatives": [None]}, "negatives holds None"),
        ({"query": tid, "expand": None}, "expand must be 0"),
        ({"query": tid, "expand": 2.5}, "expand must be 0"),
        ({"query": tid, "k": True}, "k must be a positive"),
    )
    for kwargs, message in bad_search:
        with pytest.raises(QueryError, match=message):
            geoir.search(index=index, model=model, **kwargs)  # type: ignore[arg-type]
    # What a hits frame holds is a query as is: its tile field ("tile:ID"), its ids as an array; a huge k is
    # as many hits as there are tiles.
    ids = hits.tile_id.to_numpy()
    by_array = geoir.search(ids, index=index, k=10**12, model=model, include_query_overlap=True).hits
    assert len(by_array) == 4 and set(ids) <= set(by_array.tile_id)
    by_text = geoir.search(list(hits.tile), index=index, k=10**12, model=model, include_query_overlap=True).hits
    assert by_text.tile_id.tolist() == by_array.tile_id.tolist()
    shouted = [t.upper() for t in hits.tile]  # "TILE:ID", as typed with caps lock on, is a tile id too
    by_caps = geoir.search(shouted, index=index, k=10**12, model=model, include_query_overlap=True).hits
    assert by_caps.tile_id.tolist() == by_array.tile_id.tolist()
    assert len(geoir.search(tid, index=index, negatives=None, model=model).hits) == 3  # None: no negatives
    for kwargs, message, error in (
        ({"batch_size": 0}, "batch_size", TilingError),
        ({"workers": -1}, "workers", TilingError),
        ({"scenes": []}, "no scenes", TilingError),
        ({"scenes": None}, "scenes must be a path or a list of paths", GeoirError),
        ({"scenes": [str(scene), 7]}, r"scenes must hold paths \(str or pathlib.Path\), not 7", GeoirError),
        ({"index": None}, "index must be a path", GeoirError),
        ({"params": {"size": 128}}, "params must be a TilingParams", TilingError),
        ({"bands": (1.0, 2.0, 3.0)}, "give 1-based band numbers", TilingError),
        ({"bands": "1,2,3"}, "not a sequence of band numbers", TilingError),
        ({"stretch": "0,3000"}, "is not a sequence of numbers", TilingError),
        ({"stretch": (0, 3000, 1)}, r"stretch \(0, 3000, 1\): give LOW,HIGH", TilingError),
        ({"stretch": (10, 10)}, "each HIGH must be above its LOW", TilingError),
        ({"stretch": (0, 10**400)}, "give LOW,HIGH", TilingError),  # beyond any float: not an OverflowError
        ({"model": 123}, "model must be a model file", ModelError),
    ):
        with pytest.raises(error, match=message):
            geoir.tile(**{"scenes": str(scene), "index": tmp_path / "y", "model": model, **kwargs})  # type: ignore[arg-type]
    assert not (tmp_path / "y").exists()
    for kwargs, message in ({"size": 128.5}, "size must be a whole"), ({"gsd": "1"}, "gsd must be a number"):
        with pytest.raises(TilingError, match=message):
            TilingParams(**kwargs)  # type: ignore[arg-type]
    # numpy numbers are numbers: bands, batch sizes and tile sizes.
    report = geoir.tile(scene, index=tmp_path / "np", model=model, bands=np.array([3, 2, 1]), batch_size=np.int64(2),
                        params=TilingParams(size=np.int64(256)))  # fmt: skip
    assert report.tiles_added == 4
    png = tmp_path / "q.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
    assert geoir.encode_images(str(png), model=model).shape[0] == 1  # one path alone, not its characters


def test_python_api_refuses_what_python_would_take_silently(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    """tta="no" (true in Python) switched 8-turn averaging on and wrote "no" into the manifest; a nodata or a
    bbox of the wrong type, write_layers' format and layers, gave raw TypeError and KeyError; k, expand and
    bbox were checked only after the query was encoded."""
    import sqlite3

    from geoir.errors import GeoirError, ModelError, QueryError, TilingError
    from geoir.output.writers import write_layers

    model = load_model("backbone", backbone="test")
    scene = make_geotiff(shape=(3, 512, 512))
    index = tmp_path / "idx"
    for kwargs, message, error in (
        ({"tta": "no"}, "tta must be True or False", ModelError),
        ({"encode": "no"}, "encode must be True or False", TilingError),
        ({"skip_unreadable": 1}, "skip_unreadable must be True or False", TilingError),
        ({"nodata": "zero"}, "nodata must be a number", TilingError),
        (
            {"scenes": np.array(["a.tif"])},
            r"scenes must be a path or a list of paths .*, got a <U5 array of shape \(1,\)",
            GeoirError,
        ),
    ):
        with pytest.raises(error, match=message):
            geoir.tile(**{"scenes": str(scene), "index": index, "model": model, **kwargs})  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="tta must be True or False"):
        load_model("backbone", backbone="test", tta="no")  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="tta must be True or False"):
        geoir.encode_images("a.png", model="backbone", tta="no")  # type: ignore[arg-type]
    assert not index.exists()
    # Checked before the bundle is opened: the index named here does not exist.
    for kwargs, message in (
        ({"k": 0}, "k must be a positive"),
        ({"expand": -1}, "expand must be 0"),
        ({"bbox": (4.98, 51.83, 5.0, "51.85")}, "give 4 numbers"),
        ({"bbox": 5}, "give 4 numbers"),
        ({"bbox": (10, 0, 5, 1)}, "355 degrees wide; swap west and east"),
        ({"include_query_overlap": "yes"}, "include_query_overlap must be True or False"),
        ({"rotations": None}, "rotations must be True or False"),
        ({"query": {"a": 1}}, "is a mapping, not a query"),
    ):
        with pytest.raises(QueryError, match=message):
            geoir.search(**{"query": 1, "index": tmp_path / "none", "model": model, **kwargs})  # type: ignore[arg-type]
    geoir.tile(str(scene), index=index, model=model)
    hits = geoir.search(np.zeros((3, 64, 64), np.uint8), index=index, k=2, model=model)
    for args, message in (
        (({"hits": hits.hits}, tmp_path / "h.gpkg", "GPKG"), "fmt 'GPKG' is not an output format; give one of gpkg"),
        (({"hits_merged": hits.hits}, tmp_path / "h.gpkg", "gpkg"), "a dict with a 'hits' GeoDataFrame"),
        (({"hits": hits.hits, "other": hits.hits}, tmp_path / "h.gpkg", "gpkg"), "'other' must be one of hits"),
        ((hits, 5, "gpkg"), "out must be a path"),
        # The pairing the command line refuses: GeoJSON in a .gpkg file, which QGIS would not open.
        ((hits, tmp_path / "w.gpkg", "geojson"), "fmt 'geojson' contradicts .*w.gpkg, whose suffix names gpkg"),
        ((hits, tmp_path / "w.shp"), "cannot tell the format of .*w.shp from its suffix"),
    ):
        with pytest.raises(QueryError, match=message):
            write_layers(*args)  # type: ignore[arg-type]
    assert not list(tmp_path.glob("w.*"))
    # A search's Hits, as they are: its three layers, in the format the suffix names.
    write_layers(hits, tmp_path / "h.gpkg")
    with sqlite3.connect(tmp_path / "h.gpkg") as con:
        names = {r[0] for r in con.execute("SELECT table_name FROM gpkg_contents")}
    assert names == {"hits", "hits_merged", "query", "layer_styles"}
    assert issubclass(geoir.GeoirError, Exception) and geoir.GeoirError is GeoirError
    # A model in a notebook cell is one line, not its meta (the default's lists 420 test images: 15,000 chars).
    default = load_model("default", backbone_on_demand=True)
    assert repr(default) == (
        "Model(name='default', kind='combined', backbone='tf_efficientnet_lite0', embedding_dim=2048, bits=64, "
        "device='cpu')"
    )


def test_python_api_loads_a_bundles_model_once_for_repeated_searches(
    make_geotiff: MakeGeoTiff, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A notebook searching in a loop without model= loaded the model every time (1 to 4 s a search)."""
    from geoir import api

    scene = make_geotiff()
    geoir.tile(str(scene), index=tmp_path / "a", model=load_model("backbone", backbone="test"))
    geoir.tile(str(scene), index=tmp_path / "b", model=load_model("backbone", backbone="test", tta=True))
    loads: list[object] = []
    real = api.model_for_bundle
    monkeypatch.setattr(api, "model_for_bundle", lambda *a, **k: loads.append(a) or real(*a, **k))
    monkeypatch.setattr(api, "_LAST_MODEL", None)
    patch = np.zeros((3, 64, 64), np.uint8)
    first = geoir.search(patch, index=tmp_path / "a", k=3).hits
    for _ in range(3):
        assert geoir.search(patch, index=tmp_path / "a", k=3).hits.tile_id.tolist() == first.tile_id.tolist()
    assert len(loads) == 1
    # Another bundle's model (averaged over 8 turns): loaded for it, not the one kept.
    geoir.search(patch, index=tmp_path / "b", k=3)
    assert len(loads) == 2 and api._LAST_MODEL is not None and api._LAST_MODEL[1].backbone.tta


def test_the_documented_api_type_checks_for_a_user(tmp_path: Path) -> None:
    """`geoir.search` and the rest were `object` to mypy (the lazy module __getattr__): every documented call
    was an error in a user's type-checked script, though the package ships py.typed."""
    import os
    import subprocess
    import sys

    pytest.importorskip("mypy")
    script = tmp_path / "user.py"
    script.write_text(
        "import numpy as np\n\nimport geoir\n\n"
        'hits: geoir.Hits = geoir.search(np.int64(5), index="i", k=3, negatives=["water.png", 7])\n'
        'model: geoir.Model = geoir.load_model("backbone")\n'
        'vectors: np.ndarray = geoir.encode_images(["a.png"], model=model)\n'
        'added: int = geoir.tile("scene.tif", index="i").tiles_added\n'
        'wrong: str = geoir.tile("scene.tif", index="i").tiles_added\n'
    )
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--cache-dir", str(tmp_path / "cache"), str(script)],
        capture_output=True,
        text=True,
        env={**os.environ, "MYPYPATH": str(REPO)},
        cwd=tmp_path,
    )
    # One error, the deliberate one: the rest of the script type-checks.
    assert r.stdout.count("error:") == 1 and "user.py:9: error: Incompatible types" in r.stdout, r.stdout


def test_lazy_api_attribute() -> None:
    assert callable(geoir.tile) and callable(geoir.search)
    with pytest.raises(AttributeError):
        geoir.nope  # noqa: B018
    assert {"Hits", "Model", "tile", "search"} <= set(dir(geoir)) and "Hits" in geoir.__all__


@needs_repo_file("examples/demo.py")
def test_demo_rebuilds_its_own_index_when_another_release_built_it(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("demo", REPO / "examples" / "demo.py")
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
