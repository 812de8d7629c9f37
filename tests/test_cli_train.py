"""geoir train / eval through the CLI on small generated data sets (tiny backbone), and model use."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from geoir.cli import cli
from geoir.encoding.model import load_model
from geoir.index.bundle import Bundle
from tests.conftest import MakeGeoTiff

TEST_BACKBONE = ["--backbone", "test", "--device", "cpu"]


@pytest.fixture
def image_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """4 classes x 12 images: each class a colour with noise, so classes are separable."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(12):
            img = np.clip(np.array(colour) + rng.normal(0, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class{c}" / f"{i}.png")
    return root


def invoke(*args: str, code: int = 0):  # type: ignore[no-untyped-def]
    r = CliRunner().invoke(cli, ["-q", *args])
    assert r.exit_code == code, (r.output, r.exception)
    return r


@pytest.mark.parametrize("method", ["srl", "dgssh", "plain", "combined"])
def test_train_writes_a_usable_model(image_folder: Path, tmp_path: Path, method: str) -> None:
    out = tmp_path / f"{method}.pt"
    invoke(
        "train",
        str(image_folder),
        "--method",
        method,
        "--bits",
        "16",
        "--epochs",
        "3",
        "--out",
        str(out),
        *TEST_BACKBONE,
    )
    model = load_model(out)
    assert model.meta["recipe"]["method"] == method
    # 20% of each class of 12 images is held out for eval.
    assert len(model.meta["split"]["test_items"]) == 4 * round(12 * 0.2)
    assert model.meta["data"]["classes"] == 4
    held_out = set(model.meta["split"]["test_items"])
    assert held_out and all(item.startswith("class") for item in held_out)
    if method in ("dgssh", "plain", "combined"):
        assert model.bits == 16
    else:
        assert model.bits is None


def test_trained_model_tiles_and_searches(image_folder: Path, tmp_path: Path, make_geotiff: MakeGeoTiff) -> None:
    model = tmp_path / "m.pt"
    invoke(
        "train",
        str(image_folder),
        "--method",
        "combined",
        "--bits",
        "32",
        "--epochs",
        "2",
        "--out",
        str(model),
        *TEST_BACKBONE,
    )
    index = tmp_path / "idx"
    scene = make_geotiff(shape=(3, 512, 512))
    invoke("tile", str(scene), "--index", str(index), "--model", str(model), "--workers", "0")
    bundle = Bundle.open(index)
    assert set(bundle.indexes()) == {"float", "binary"} and bundle.model["bits"] == 32
    assert bundle.vectors()["codes"].shape == (4, 4)
    out = tmp_path / "h.gpkg"
    # No --model: the bundle's own model file is found from its manifest.
    tid = int(bundle.tiles().tile_id[0])
    invoke("search", f"tile:{tid}", "--index", str(index), "--out", str(out), "-k", "3", "--include-query-overlap")
    assert gpd.read_file(out, layer="hits").tile_id[0] == tid


def test_eval_report(image_folder: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.pt"
    invoke("train", str(image_folder), "--method", "srl", "--epochs", "2", "--out", str(model), *TEST_BACKBONE)
    report = tmp_path / "r.json"
    png = tmp_path / "pr.png"
    invoke(
        "eval",
        str(image_folder),
        "--model",
        str(model),
        "--protocol",
        "seen",
        "--seeds",
        "0,1",
        "--json",
        str(report),
        "--pr-curve",
        str(png),
        "--splits-dir",
        str(tmp_path / "splits"),
    )
    r = json.loads(report.read_text())
    seen = r["protocols"]["seen"]
    assert set(seen) == {"backbone float", "srl float"}
    for summary in seen.values():
        assert len(summary["runs"]) == 2 and 0 <= summary["mAP_mean"] <= 1
    assert Image.open(png).size == (640, 480)
    split = json.loads((tmp_path / "splits" / "seen_seed0.json").read_text())
    assert not set(split["train_paths"]) & set(split["test_paths"])


def test_train_errors(tmp_path: Path) -> None:
    (tmp_path / "one" / "a").mkdir(parents=True)
    r = CliRunner().invoke(cli, ["train", str(tmp_path / "one"), "--out", str(tmp_path / "m.pt"), *TEST_BACKBONE])
    assert r.exit_code == 1 and "at least 2" in r.output
    r = CliRunner().invoke(cli, ["train", str(tmp_path / "one"), "--out", str(tmp_path / "m.pt"), "--bits", "20"])
    assert r.exit_code == 2
    labels = tmp_path / "l.geojson"
    labels.write_text('{"type": "FeatureCollection", "features": []}')
    r = CliRunner().invoke(cli, ["train", str(labels), "--out", str(tmp_path / "m.pt"), *TEST_BACKBONE])
    assert r.exit_code == 2 and "--index" in r.output
    assert not (tmp_path / "m.pt").exists()
