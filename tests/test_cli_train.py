"""geoir train / eval through the CLI on small generated data sets (tiny backbone), and model use."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
import torch
from click.testing import CliRunner
from PIL import Image

from geoir.cli import cli
from geoir.encoding.backbone import load_backbone
from geoir.encoding.model import load_model
from geoir.errors import DatasetError
from geoir.index.bundle import Bundle
from geoir.training.data import bundle_features, cache_dir, dihedral, image_folder_features, label_text
from geoir.training.recipes import Recipe
from tests.conftest import MakeGeoTiff, geoir_warnings

TEST_BACKBONE = ["--backbone", "test", "--device", "cpu"]


def colour_folder(root: Path, noise: float) -> Path:
    """4 classes x 12 images: each class a colour under Gaussian noise of std ``noise`` (40: separable)."""
    rng = np.random.default_rng(0)
    for c, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(12):
            img = np.clip(np.array(colour) + rng.normal(0, noise, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """4 classes x 12 images: each class a colour with noise, so classes are separable."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return colour_folder(tmp_path / "data", 40)


def invoke(*args: str, code: int = 0):  # type: ignore[no-untyped-def]
    r = CliRunner().invoke(cli, ["-q", *args])
    assert r.exit_code == code, (r.output, r.exception)
    return r


def test_train_shows_a_bar_per_training_loop_and_quiet_hides_them(image_folder: Path, tmp_path: Path) -> None:
    args = ["train", str(image_folder), "--bits", "16", "--epochs", "2", "--augment", "none", *TEST_BACKBONE]
    r = CliRunner().invoke(cli, ["-v", *args, "--out", str(tmp_path / "a.pt")])
    assert r.exit_code == 0, (r.output, r.exception)
    # The backbone's features, then the shipped recipe's loops; -v's per-epoch lines print above the bars.
    for label in ("SRL head", "SRL head, retention probe", "SRL retention choices", "DGSSH head (16 bits)"):
        assert f"{label}: 100%" in r.stderr, label
    assert "2/2 [" in r.stderr and "val mAP" in r.stderr and "debug: dgssh epoch 2:" in r.stderr
    assert "features: 100%" in r.stderr and "image/s" in r.stderr and "tile/s" not in r.stderr  # images, not tiles
    quiet = CliRunner().invoke(cli, ["-q", *args, "--out", str(tmp_path / "b.pt")])
    assert quiet.exit_code == 0 and "SRL head" not in quiet.stderr and "100%" not in quiet.stderr


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
    # `geoir info --model` shows what the file records.
    text = invoke("info", "--model", str(out)).output
    assert f"fingerprint {model.fingerprint[:12]}" in text
    # The recipe line shows the settings that shaped this method's heads, as they took effect.
    (recipe,) = [line.split()[1:] for line in text.splitlines() if line.startswith("recipe ")]
    assert recipe[0] == f"method={method}" and ("bits=16" in recipe) == (method != "srl")
    assert ("retain_dim=256" in recipe) == ("distill=10.0" in recipe) == (method in ("srl", "combined"))
    assert "fuse_codes=False" not in recipe or method == "combined"
    assert ("refit=codes" in recipe) == (method != "srl") and ("refit=none" in recipe) == (method == "srl")
    assert f"held out    {len(held_out)} for evaluation" in text and "4 classes" in text
    assert ("16-bit codes" in text) == (method != "srl")
    assert ("float embedding" in text) == (method in ("srl", "combined"))
    doc = json.loads(invoke("info", "--model", str(out), "--json").output)
    assert doc["model"]["fingerprint"] == model.fingerprint and doc["meta"]["recipe"]["method"] == method


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
    # Query expansion through the code-then-float search: the float distances are those of the query averaged
    # with its first 2 hits (the codes only propose candidates, and here every tile is one).
    plain = tmp_path / "p.gpkg"
    args = ["search", f"tile:{tid}", "--index", str(index), "-k", "4", "--include-query-overlap"]
    invoke(*args, "--out", str(plain))
    invoke(*args, "--expand", "2", "--out", str(out), "--overwrite")
    first = gpd.read_file(plain, layer="hits").tile_id[:2].tolist()
    vec = bundle.vectors()
    emb = {int(t): e.astype(np.float64) for t, e in zip(vec["ids"], vec["embedding"], strict=True)}
    q = emb[tid] + emb[first[0]] + emb[first[1]]
    q /= np.linalg.norm(q)
    hits = gpd.read_file(out, layer="hits")
    want = sorted(float(np.linalg.norm(e - q)) for e in emb.values())
    assert len(hits) == 4 and hits["distance"].to_numpy() == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("method", ["dgssh", "combined"])
def test_hash_only_models_rank_by_their_codes(
    image_folder: Path, tmp_path: Path, make_geotiff: MakeGeoTiff, method: str
) -> None:
    # A DGSSH head was trained to rank by Hamming distance; its float vector is the backbone's, which must not
    # override the codes (it only breaks their ties). A combined head ranks by its trained float embedding.
    model = tmp_path / "m.pt"
    args = ["--method", method, "--bits", "16", "--epochs", "2", "--out", str(model), *TEST_BACKBONE]
    invoke("train", str(image_folder), *args)
    index = tmp_path / "idx"
    scene = make_geotiff(shape=(3, 2048, 2048), bounds=(500_000.0, 4_000_000.0, 520_480.0, 4_020_480.0))
    invoke("tile", str(scene), "--index", str(index), "--model", str(model), "--workers", "0")
    vec = Bundle.open(index).vectors()
    bits = np.unpackbits(vec["codes"], axis=1).astype(int)
    emb = vec["embedding"].astype(np.float64)
    for tid in vec["ids"][:3]:
        out = tmp_path / f"h{tid}.gpkg"
        invoke("search", f"tile:{tid}", "--index", str(index), "--out", str(out), "-k", "20", "--include-query-overlap")
        hits = gpd.read_file(out, layer="hits")
        row = int(np.flatnonzero(vec["ids"] == tid)[0])
        ham = (bits != bits[row]).sum(axis=1)
        dist = np.linalg.norm(emb - emb[row], axis=1)
        key = np.lexsort((vec["ids"], dist, ham)) if method == "dgssh" else np.lexsort((vec["ids"], dist))
        assert hits.tile_id.tolist() == vec["ids"][key][:20].tolist()
        assert hits.hamming.tolist() == ham[key][:20].tolist()
        assert hits["distance"].to_numpy() == pytest.approx(dist[key][:20], abs=1e-3)


@pytest.mark.parametrize("min_candidates", [1000, 1])
def test_small_bundle_with_codes_is_ranked_exactly_by_the_float_embedding(
    image_folder: Path, tmp_path: Path, make_geotiff: MakeGeoTiff, monkeypatch: pytest.MonkeyPatch, min_candidates: int
) -> None:
    # 64 tiles, k = 1: 20 Hamming candidates alone may miss the float embedding's best tile; with the floor of
    # candidates every tile of a small bundle is re-ranked and the hit is the exact float nearest.
    import geoir.retrieval.engine as engine

    monkeypatch.setattr(engine, "MIN_CANDIDATES", min_candidates)
    model = tmp_path / "m.pt"
    args = ["--method", "combined", "--bits", "16", "--epochs", "2", "--out", str(model), *TEST_BACKBONE]
    invoke("train", str(image_folder), *args)
    index = tmp_path / "idx"
    scene = make_geotiff(shape=(3, 2048, 2048), bounds=(500_000.0, 4_000_000.0, 520_480.0, 4_020_480.0))
    invoke("tile", str(scene), "--index", str(index), "--model", str(model), "--workers", "0")
    vec = Bundle.open(index).vectors()
    assert len(vec["ids"]) == 64
    rng = np.random.default_rng(0)
    exact = []
    for i in range(6):
        png = tmp_path / f"q{i}.png"
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(png)
        npz = tmp_path / f"q{i}.npz"
        invoke("encode", str(png), "--model", str(model), "--out", str(npz))
        emb = np.load(npz)["embedding"][0]
        dist = np.linalg.norm(vec["embedding"].astype(np.float64) - emb, axis=1)
        out = tmp_path / f"h{i}.gpkg"
        invoke("search", str(png), "--index", str(index), "--out", str(out), "-k", "1", "--no-rotations")
        hit = gpd.read_file(out, layer="hits").iloc[0]
        exact.append(hit.tile_id == vec["ids"][np.argmin(dist)])
    assert all(exact) if min_candidates == 1000 else not all(exact)


def test_fuse_codes_model_tiles_with_its_own_width(
    image_folder: Path, tmp_path: Path, make_geotiff: MakeGeoTiff
) -> None:
    model = tmp_path / "f.pt"
    args = ["train", str(image_folder), "--bits", "16", "--epochs", "2", "--retain-dim", "8", *TEST_BACKBONE]
    invoke(*args, "--fuse-codes", "--out", str(model))
    m = load_model(model)
    assert m.meta["recipe"]["fuse_codes"] is True
    fuse = m.meta["history"]["srl"]["fuse"]
    assert m.head_config.get("fuse", 0.0) == fuse and m.embedding_dim == m.head.srl.embedding_dim + (16 if fuse else 0)
    index = tmp_path / "idx"
    invoke("tile", str(make_geotiff(shape=(3, 512, 512))), "--index", str(index), "--model", str(model))
    assert Bundle.open(index).vectors()["embedding"].shape == (4, m.embedding_dim)
    # Fusion needs both heads and retention; a refused recipe writes nothing.
    bad = tmp_path / "bad.pt"
    r = invoke(*args, "--fuse-codes", "--method", "srl", "--out", str(bad), code=1)
    assert "--fuse-codes" in r.output and not bad.exists()


def test_train_refit_is_recorded_and_shown(image_folder: Path, tmp_path: Path) -> None:
    model = tmp_path / "r.pt"
    args = ["train", str(image_folder), "--bits", "16", "--epochs", "2", "--retain-dim", "8", *TEST_BACKBONE]
    # By default only the hash head is trained again, on every training image.
    invoke(*args, "--out", str(tmp_path / "codes.pt"))
    m = load_model(tmp_path / "codes.pt")
    n_train = 4 * 12 - len(m.meta["split"]["test_items"])
    assert m.meta["recipe"]["refit"] == "codes"
    assert m.meta["history"]["dgssh"]["refit"]["items"] == n_train and "refit" not in m.meta["history"]["srl"]
    text = invoke("info", "--model", str(tmp_path / "codes.pt")).output
    assert "refit=codes" in text and text.count(f"then re-trained on all {n_train} items") == 1
    invoke(*args, "--refit", "all", "--out", str(model))
    m = load_model(model)
    assert m.meta["recipe"]["refit"] == "all"
    for part in ("srl", "dgssh"):  # both heads of the combined recipe, each on every training image
        assert m.meta["history"][part]["refit"]["items"] == n_train
    text = invoke("info", "--model", str(model)).output
    assert "refit=all" in text and text.count(f"then re-trained on all {n_train} items") == 2
    bad = tmp_path / "bad.pt"
    r = invoke(*args, "--refit", "both", "--out", str(bad), code=2)
    assert "--refit" in r.output and "'codes'" in r.output and not bad.exists()
    # `geoir eval` re-trains the recipe the model records, refit included, on each split.
    report = tmp_path / "r.json"
    invoke(
        "eval", str(image_folder), "--model", str(model), "--protocol", "seen", "--seeds", "0", "--json", str(report)
    )
    r = json.loads(report.read_text())
    from geoir.training.protocols import stratified_split

    n_split = len(stratified_split(np.repeat(np.arange(4), 12), 0.8, 0).train)
    assert r["recipe"]["refit"] == "all"
    assert {part: h["refit"]["items"] for part, h in r["training"]["seen_seed0"].items()} == {
        "srl": n_split,
        "dgssh": n_split,
    }


def test_eval_report(image_folder: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.pt"
    invoke("train", str(image_folder), "--method", "srl", "--epochs", "2", "--out", str(model), *TEST_BACKBONE)
    report = tmp_path / "r.json"
    png = tmp_path / "pr.png"
    printed = invoke(
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
    # Class indices of the per-class figures are named.
    assert r["class_names"] == ["class0", "class1", "class2", "class3"]
    assert set(seen["srl float"]["runs"][0]["per_class_ap"]) == {"0", "1", "2", "3"}
    for summary in seen.values():
        assert len(summary["runs"]) == 2 and 0 <= summary["mAP_mean"] <= 1
    # The means are printed too, one row per variant, as the report holds them.
    for name, summary in seen.items():
        row = f"| seen | {name} | {summary['mAP_mean']:.4f} ± {summary['mAP_std']:.4f} | "
        assert row in printed.output and printed.output.count(f"| seen | {name} |") == 1
    assert Image.open(png).size == (640, 480)
    # What validation chose for the head re-trained on each split: its epoch and its retention.
    assert set(r["training"]) == {"seen_seed0", "seen_seed1"}
    for chose in r["training"].values():
        assert 0 <= chose["srl"]["best_epoch"] <= 2 and 0 <= chose["srl"]["retain_angle"] <= 1.6
        assert len(chose["srl"].get("retain_gate", [0.0] * 4)) == 4
    split = json.loads((tmp_path / "splits" / "seen_seed0.json").read_text())
    assert not set(split["train_paths"]) & set(split["test_paths"])


def test_a_one_seed_table_shows_no_spread() -> None:
    """One seed printed "0.5614 ± 0.0000": a spread over one run is undefined, not zero."""
    from geoir.training.evaluation import summary_table

    one = {"mAP_mean": 0.5614, "mAP_std": 0.0, "runs": [{}]}
    two = {"mAP_mean": 0.5, "mAP_std": 0.01, "runs": [{}, {}]}
    table = summary_table({"protocols": {"seen": {"srl float": one, "backbone float": two}}})
    assert "| seen | srl float | 0.5614 | " in table and "| seen | backbone float | 0.5000 ± 0.0100 | " in table


def test_train_errors(tmp_path: Path) -> None:
    (tmp_path / "one" / "a").mkdir(parents=True)
    r = CliRunner().invoke(cli, ["train", str(tmp_path / "one"), "--out", str(tmp_path / "m.pt"), *TEST_BACKBONE])
    assert r.exit_code == 1 and "at least 2" in r.output
    r = CliRunner().invoke(cli, ["train", str(tmp_path / "one"), "--out", str(tmp_path / "m.pt"), "--bits", "20"])
    assert r.exit_code == 2
    r = CliRunner().invoke(cli, ["train", str(tmp_path / "one"), "--out", str(tmp_path / "m.pt"), "--distill", "-1"])
    assert r.exit_code == 2 and "--distill" in r.output
    r = CliRunner().invoke(cli, ["train", str(tmp_path / "one"), "--out", str(tmp_path / "m.pt"), "--distill", "inf"])
    assert r.exit_code == 1 and "--distill inf" in r.output
    labels = tmp_path / "l.geojson"
    labels.write_text('{"type": "FeatureCollection", "features": []}')
    r = CliRunner().invoke(cli, ["train", str(labels), "--out", str(tmp_path / "m.pt"), *TEST_BACKBONE])
    assert r.exit_code == 2 and "--index" in r.output
    assert not (tmp_path / "m.pt").exists()


def test_dihedral_views_are_the_eight_symmetries() -> None:
    img = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)  # (C, H, W), no symmetry of its own
    views = [dihedral(img, v) for v in range(8)]
    assert len({v.tobytes() + bytes(v.shape) for v in views}) == 8
    assert np.array_equal(views[0], img)
    assert np.array_equal(views[1], np.stack([np.rot90(c) for c in img]))  # a quarter turn, every band alike
    assert np.array_equal(views[4], img[:, :, ::-1])  # a left-right flip
    turned = img
    for _ in range(4):
        turned = dihedral(turned, 1)
    assert np.array_equal(turned, img)


def test_dihedral_features_are_cached_per_view(image_folder: Path) -> None:
    bb = load_backbone("test")
    data = image_folder_features(image_folder, bb, augment="dihedral")
    assert data.views is not None and data.views.shape == (7, *data.features.shape)
    # View 5 (a quarter turn then a flip) of the first image, encoded directly.
    img = np.asarray(
        Image.open(image_folder / data.items[0]).convert("RGB").resize((256, 256), Image.Resampling.BILINEAR)
    ).transpose(2, 0, 1)
    direct = bb.features(torch.from_numpy(dihedral(img, 5))[None]).numpy()[0]
    np.testing.assert_allclose(data.views[4, 0], direct, atol=1e-5)
    assert not np.allclose(data.views[4], data.features)
    cached = sorted(p.name for p in cache_dir().iterdir())
    assert len(cached) == 8 and sum(".view" in n for n in cached) == 7
    again = image_folder_features(image_folder, bb, augment="dihedral")
    assert np.array_equal(again.views, data.views)  # type: ignore[arg-type]
    assert image_folder_features(image_folder, bb).views is None
    with pytest.raises(DatasetError, match="unknown augmentation"):
        image_folder_features(image_folder, bb, augment="mirror")


def test_train_records_the_augmentation(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    args = ("train", str(image_folder), "--method", "srl", "--epochs", "2", *TEST_BACKBONE)
    invoke(*args, "--no-retain-gate", "--out", str(out))
    meta = load_model(out).meta
    # --augment auto without the retention gate: the float embedding trains on the images as given.
    assert meta["recipe"]["augment"] == "dihedral-codes"
    # An SRL head trains on no view under dihedral-codes, so none was computed: only view 0 is cached.
    assert [p.name for p in cache_dir().iterdir() if ".view" in p.name] == []
    # With the gate (the default), auto trains every head on the 7 other views too, as the shipped model.
    gated = tmp_path / "g.pt"
    invoke(*args, "--out", str(gated))
    assert load_model(gated).meta["recipe"]["augment"] == "dihedral"
    assert len([p for p in cache_dir().iterdir() if ".view" in p.name]) == 7
    none = tmp_path / "n.pt"
    invoke("train", str(image_folder), "--method", "srl", "--epochs", "2", "--augment", "none", "--out", str(none))
    assert load_model(none).meta["recipe"]["augment"] == "none"
    # Recipes recorded before augmentation existed trained without it.
    assert Recipe.from_dict({"method": "srl"}).augment == "none"


def test_model_records_its_data_by_name_and_digest_not_by_path(image_folder: Path, tmp_path: Path) -> None:
    import shutil

    copy, renamed = tmp_path / "copy" / "data", tmp_path / "renamed" / "data"
    shutil.copytree(image_folder, copy)
    shutil.copytree(image_folder, renamed)
    (renamed / "class3" / "0.png").rename(renamed / "class3" / "renamed.png")
    data = []
    for i, root in enumerate((image_folder, copy, renamed)):
        out = tmp_path / f"{i}.pt"
        args = ("--method", "dgssh", "--bits", "16", "--epochs", "1")
        invoke("train", str(root), *args, "--out", str(out), *TEST_BACKBONE)
        data.append(load_model(out).meta["data"])
    # The folder's name, not the trainer's path: a model file says nothing about the machine it came from.
    assert [d["dataset"] for d in data] == ["data"] * 3
    assert str(tmp_path) not in json.dumps(data)
    # The digest says what the folder held: the same wherever it lies, another once an image is renamed.
    digests = [d["items_sha256"] for d in data]
    assert len(digests[0]) == 64 and digests[0] == digests[1] != digests[2]
    assert [d["samples"] for d in data] == [48] * 3
    assert (
        f"data        data: 48 samples, 4 classes (items sha256 {digests[2][:12]})"
        in invoke("info", "--model", str(tmp_path / "2.pt")).output
    )


def labelled_bundle(tmp_path: Path, make_geotiff: MakeGeoTiff, side: int, per_class: int) -> tuple[Path, Path]:
    """A bundle of the test backbone's features over one scene of ``side`` px (256 px tiles), and a GeoPackage
    labelling every tile by a point inside it: bands of ``per_class`` tiles from north to south, one class
    each. Returns (bundle, labels)."""
    index = tmp_path / "idx"
    m = side * 10.0  # 10 m pixels
    scene = make_geotiff(shape=(3, side, side), bounds=(500_000.0, 4_000_000.0, 500_000.0 + m, 4_000_000.0 + m))
    invoke("tile", str(scene), "--index", str(index), "--model", "backbone", *TEST_BACKBONE, "--workers", "0")
    tiles = Bundle.open(index).tiles()
    assert len(tiles) == (side // 256) ** 2
    centres = tiles.geometry.representative_point()
    band = np.argsort(np.argsort(-centres.y.to_numpy())) // per_class
    labels = gpd.GeoDataFrame({"label": [f"band{b}" for b in band]}, geometry=centres.to_numpy(), crs=tiles.crs)
    gpkg = tmp_path / "labels.gpkg"
    labels.to_file(gpkg)
    return index, gpkg


def test_train_on_labelled_tiles_of_a_bundle(tmp_path: Path, make_geotiff: MakeGeoTiff) -> None:
    # 16 tiles, two classes of 8 (the scene's northern and southern halves).
    index, gpkg = labelled_bundle(tmp_path, make_geotiff, 1024, 8)
    out = tmp_path / "m.pt"
    r = CliRunner().invoke(
        cli, ["train", str(gpkg), "--index", str(index), "--augment", "dihedral", "--out", str(out), "--device", "cpu"]
    )
    assert r.exit_code == 2 and "--augment none" in r.output and not out.exists()
    invoke(
        "train", str(gpkg), "--index", str(index), "--method", "srl", "--epochs", "2", "--augment", "none",
        "--out", str(out), "--device", "cpu",
    )  # fmt: skip
    meta = load_model(out).meta
    assert meta["data"]["samples"] == 16 and meta["data"]["classes"] == 2
    # --augment auto means none for labelled tiles, so they train without the option, hash heads too.
    auto = tmp_path / "auto.pt"
    invoke("train", str(gpkg), "--index", str(index), "--method", "combined", "--epochs", "1", "--out", str(auto))
    assert load_model(auto).meta["recipe"]["augment"] == "none"
    # An SRL head needs no views under dihedral-codes, so labelled tiles train with it too.
    srl = tmp_path / "srl.pt"
    invoke(
        "train", str(gpkg), "--index", str(index), "--method", "srl", "--epochs", "1", "--augment", "dihedral-codes",
        "--out", str(srl),
    )  # fmt: skip
    assert load_model(srl).meta["recipe"]["augment"] == "dihedral-codes"
    assert all(item.startswith("tile:") for item in meta["split"]["test_items"])


def test_a_model_file_overwritten_under_its_bundle_is_named(tmp_path: Path, make_geotiff: MakeGeoTiff) -> None:
    """Re-training to the file a bundle was encoded with (train --overwrite, as training.md's last step
    suggests) left "use that model (--model)" as the only advice, which no file could follow any more."""
    index, gpkg = labelled_bundle(tmp_path, make_geotiff, 1024, 8)
    out = tmp_path / "m.pt"
    train = ["train", str(gpkg), "--index", str(index), "--method", "srl", "--augment", "none", "--out", str(out)]
    invoke(*train, "--epochs", "1")
    encoded = tmp_path / "encoded"
    invoke("tile", str(tmp_path / "scene.tif"), "--index", str(encoded), "--model", str(out), "--workers", "0")
    tid = int(Bundle.open(encoded).tiles().tile_id[0])
    r = CliRunner().invoke(cli, [*train, "--epochs", "1", "--dim", "8", "--overwrite"])  # another head
    assert r.exit_code == 0, r.output
    assert "m.pt will be replaced: bundles encoded with the model it holds" in r.output
    r = refused("search", f"tile:{tid}", "--index", str(encoded), "--out", str(tmp_path / "h.gpkg"), code=1)
    assert f"{out} was overwritten with another model since: restore that file" in r.output
    # --backbone with --index was ignored: the bundle's features are of its own backbone.
    r = refused(*train, "--backbone", "tf_efficientnet_lite0", "--overwrite", code=2)
    assert "is not the backbone" in r.output and "drop --backbone" in r.output


def test_eval_scores_labelled_tiles_of_a_bundle(tmp_path: Path, make_geotiff: MakeGeoTiff) -> None:
    # 64 tiles, four classes of 16 (bands of two tile rows).
    index, gpkg = labelled_bundle(tmp_path, make_geotiff, 2048, 16)
    model = tmp_path / "m.pt"
    invoke(
        "train",
        str(gpkg),
        "--index",
        str(index),
        "--method",
        "srl",
        "--epochs",
        "2",
        "--out",
        str(model),
        "--device",
        "cpu",
    )
    report, splits = tmp_path / "r.json", tmp_path / "splits"
    args = ["eval", str(gpkg), "--index", str(index), "--model", str(model), "--json", str(report)]
    # The unseen protocol, asked for, needs 17 classes: named, with the way out.
    r = refused(*args, "--protocol", "unseen", code=1)
    assert "has 4 classes" in r.output and "--protocol seen" in r.output and not report.exists()
    # The default protocols (seen and unseen) leave it out, and say so.
    r = invoke(*args, "--seeds", "0,1", "--splits-dir", str(splits))
    assert "has 4 classes; the unseen protocol trains on 15" in r.output and "it is left out" in r.output
    doc = json.loads(report.read_text())
    assert doc["model_file"] == str(model) and doc["model_fingerprint"] == load_model(model).fingerprint
    assert list(doc["protocols"]) == ["seen"] and sorted(p.name for p in splits.iterdir()) == [
        "seen_seed0.json",
        "seen_seed1.json",
    ]
    assert doc["data"]["items_sha256"] == load_model(model).meta["data"]["items_sha256"]  # the tiles it trained on
    assert doc["data"]["samples"] == 64 and doc["class_names"] == ["band0", "band1", "band2", "band3"]
    seen = doc["protocols"]["seen"]
    assert {"backbone float", "srl float"} <= set(seen) and all(len(v["runs"]) == 2 for v in seen.values())
    assert all(0 < run["mAP"] <= 1 for v in seen.values() for run in v["runs"])
    split = json.loads((splits / "seen_seed0.json").read_text())
    assert all(item.startswith("tile:") for item in split["test_paths"]) and len(split["test"]) == 4 * 3
    # Pixels are not in a bundle: --tta is refused, and so is a model whose recipe trains on flipped views.
    r = refused(*args, "--protocol", "seen", "--tta", "--overwrite", code=2)
    assert "--tta" in r.output and "features" in r.output
    r = refused(
        "eval", str(gpkg), "--index", str(index), "--protocol", "seen", "--json", str(report), "--overwrite", code=1
    )
    assert "the default model trains with --augment dihedral" in r.output and f"geoir train {gpkg}" in r.output
    # A folder of class folders takes no --index; a vector file needs one.
    r = refused("eval", str(tmp_path / "splits"), "--index", str(index), "--json", str(report), code=2)
    assert "leave --index out" in r.output
    r = refused("eval", str(gpkg), "--model", str(model), "--json", str(report), code=2)
    assert "pass the --index" in r.output


def _features_of(index: Path, labels: Path) -> dict[str, str]:
    """{tile item: class} that training on ``labels`` over ``index`` uses."""
    data = bundle_features(labels, Bundle.open(index))
    return {item: data.classes[c] for item, c in zip(data.items, data.labels, strict=True)}


def test_label_polygons_label_the_tiles_they_cover_not_those_they_touch(
    tmp_path: Path, make_geotiff: MakeGeoTiff
) -> None:
    # Tile outlines copied from the catalog, labelled by band (as one labels them in QGIS): each polygon
    # touches up to 8 neighbouring tiles, which must neither take its label nor become ambiguous.
    index, _ = labelled_bundle(tmp_path, make_geotiff, 1024, 8)
    tiles = Bundle.open(index).tiles()
    y = tiles.geometry.representative_point().y.to_numpy()
    north = y > np.median(y)
    outlines = gpd.GeoDataFrame(
        {"label": np.where(north, "north", "south")}, geometry=tiles.geometry.to_numpy(), crs=tiles.crs
    )
    gpkg = tmp_path / "outlines.gpkg"
    outlines.to_file(gpkg)
    expected = {f"tile:{t}": c for t, c in zip(tiles.tile_id, outlines.label, strict=True)}
    assert _features_of(index, gpkg) == expected
    # One outline alone labels its own tile, also drawn in the scene's CRS (UTM), where it is a rectangle.
    one = outlines.iloc[[5]].to_crs("EPSG:32631")
    one.to_file(tmp_path / "one.gpkg")
    assert _features_of(index, tmp_path / "one.gpkg") == {f"tile:{tiles.tile_id[5]}": outlines.label[5]}


def test_labels_are_cleaned_and_every_left_out_label_is_counted(
    tmp_path: Path, make_geotiff: MakeGeoTiff, caplog: pytest.LogCaptureFixture
) -> None:
    index, _ = labelled_bundle(tmp_path, make_geotiff, 1024, 8)
    tiles = Bundle.open(index).tiles()
    centres = list(tiles.geometry.representative_point())
    # 16 tiles: 6 'a' (two with spaces), 5 'b', an empty, a blank, a missing and two 'B' (a case variant).
    text = ["a", "a ", " a", "a", "a", "a", "b", "b", "b", "b", "b", "", "   ", None, "B", "B"]
    # Beyond them: a point on no tile (its class has no tile left), and a second label, 'b', on tile 0
    # (now under two labels: ambiguous, left out).
    far = shapely.Point(-60.0, -30.0)
    gdf = gpd.GeoDataFrame({"label": [*text, "desert", "b"]}, geometry=[*centres, far, centres[0]], crs=tiles.crs)
    gpkg = tmp_path / "labels.gpkg"
    gdf.to_file(gpkg)
    with geoir_warnings(caplog):
        got = _features_of(index, gpkg)
    assert sorted(set(got.values())) == ["B", "a", "b"]
    ids = list(tiles.tile_id)
    assert f"tile:{ids[0]}" not in got and all(got[f"tile:{ids[i]}"] == "a" for i in range(1, 6))
    assert not {f"tile:{ids[i]}" for i in (11, 12, 13)} & set(got) and len(got) == 12
    log = caplog.text
    assert "3 geometries of" in log and "have no label: left out" in log
    assert "labels 'B' and 'b' of" in log and "differ only in case" in log
    assert "1 of the 15 labelled geometries of" in log and "cover no tile" in log
    assert "1 tile under geometries of different labels left out" in log
    assert "class 'desert' has no tile left and is not trained" in log
    assert [label_text(v) for v in (None, np.nan, pd.NA, " a ", 3.0, 2.5, np.int64(4), "", "  ")] == [
        None, None, None, "a", "3", "2.5", "4", None, None,
    ]  # fmt: skip
    # Whole numbers with a gap in the column (read as floats) keep their names: '1', not '1.0'.
    numbers = gpd.GeoDataFrame({"label": [1.0] * 8 + [2.0] * 7 + [np.nan]}, geometry=centres, crs=tiles.crs)
    numbers.to_file(tmp_path / "numbers.gpkg")
    assert sorted(set(_features_of(index, tmp_path / "numbers.gpkg").values())) == ["1", "2"]


def test_bow_tie_labels_in_a_projected_crs_keep_both_areas_and_unplaceable_rows_are_counted(
    tmp_path: Path, make_geotiff: MakeGeoTiff, caplog: pytest.LogCaptureFixture
) -> None:
    # A self-crossing polygon drawn in UTM was densified before its repair, and GEOS dropped one of its two
    # triangles: half its tiles unlabelled. A mistyped coordinate (inf in lon/lat) ended in an SQL traceback,
    # and rows without a geometry were dropped unsaid.
    index, _ = labelled_bundle(tmp_path, make_geotiff, 1024, 8)  # 4 x 4 tiles of 2,560 m in EPSG:32618
    bow = shapely.Polygon([(500_000, 4_000_000), (510_240, 4_010_240), (510_240, 4_000_000), (500_000, 4_010_240)])
    north = shapely.Point(503_800, 4_009_000)  # a tile the two triangles (west and east) only touch
    drawn = gpd.GeoDataFrame(
        {"label": ["x", "y", "x", "x"]}, geometry=[bow, north, None, shapely.Point(1e8, 1e8)], crs="EPSG:32618"
    )
    drawn.to_file(tmp_path / "drawn.gpkg")
    repaired = gpd.GeoDataFrame({"label": ["x", "y"]}, geometry=[shapely.make_valid(bow), north], crs="EPSG:32618")
    repaired.to_file(tmp_path / "repaired.gpkg")
    with geoir_warnings(caplog):
        got = _features_of(index, tmp_path / "drawn.gpkg")
    assert got == _features_of(index, tmp_path / "repaired.gpkg")
    assert list(got.values()).count("x") == 12 and list(got.values()).count("y") == 1  # of 16 tiles
    assert "1 row of" in caplog.text and "has no geometry: left out" in caplog.text
    assert "1 geometry of" in caplog.text and "coordinates that its CRS cannot place in lon/lat" in caplog.text


def test_a_label_file_of_several_layers_is_read_by_the_layer_named(tmp_path: Path, make_geotiff: MakeGeoTiff) -> None:
    index, gpkg = labelled_bundle(tmp_path, make_geotiff, 1024, 8)
    tiles = Bundle.open(index).tiles()
    multi = tmp_path / "multi.gpkg"
    gpd.read_file(gpkg).iloc[:4].to_file(multi, layer="draft")
    gpd.read_file(gpkg).to_file(multi, layer="final")
    out = tmp_path / "m.pt"
    args = ["--index", str(index), "--method", "srl", "--epochs", "1", "--out", str(out), "--device", "cpu"]
    r = refused("train", str(multi), *args, code=1)
    assert f"{multi} has 2 layers (draft, final); name the one to use as {multi}:LAYER" in r.output
    assert not out.exists()
    r = refused("train", f"{multi}:other", *args, code=1)
    assert "has no layer 'other'; its layers are draft, final" in r.output
    invoke("train", f"{multi}:final", *args)
    data = load_model(out).meta["data"]
    assert data["samples"] == 16 and data["dataset"] == "multi.gpkg:final"
    r = refused("train", f"{tmp_path / 'missing.gpkg'}:final", *args, "--overwrite", code=1)
    assert "missing.gpkg:final: no such file or folder ('DATASET'); check the path" in r.output
    # Search reads --examples and --aoi the same way.
    hits = tmp_path / "h.gpkg"
    search = ["search", "--index", str(index), "--out", str(hits), *TEST_BACKBONE]
    r = refused(*search, "--examples", str(multi), code=1)
    assert "examples file" in r.output and "has 2 layers" in r.output and not hits.exists()
    r = refused(*search, f"tile:{tiles.tile_id[0]}", "--aoi", str(multi), code=1)
    assert "--aoi" in r.output and "has 2 layers" in r.output and not hits.exists()
    invoke(*search, "--examples", f"{multi}:draft", "--aoi", f"{multi}:final", "-k", "3")
    assert len(gpd.read_file(hits, layer="hits")) == 3


def test_train_and_eval_take_the_bundle_from_geoir_index_and_name_labelled_tiles(
    tmp_path: Path, make_geotiff: MakeGeoTiff, image_folder: Path
) -> None:
    index, gpkg = labelled_bundle(tmp_path, make_geotiff, 512, 2)
    env = {"GEOIR_INDEX": str(index)}
    out = tmp_path / "m.pt"
    r = CliRunner(env=env).invoke(
        cli, ["-q", "train", str(gpkg), "--method", "srl", "--epochs", "1", "--test-fraction", "0", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert load_model(out).meta["data"]["samples"] == 4
    # A folder of images needs no bundle: one set in the environment for searching is not an error.
    folder_model = tmp_path / "f.pt"
    args = ["-q", "train", str(image_folder), "--method", "srl", "--epochs", "1", "--out", str(folder_model)]
    r = CliRunner(env=env).invoke(cli, [*args, *TEST_BACKBONE])
    assert r.exit_code == 0, r.output
    # Too few labelled tiles per class: named as labelled tiles, not images.
    report = tmp_path / "r.json"
    r = CliRunner(env=env).invoke(
        cli, ["eval", str(gpkg), "--model", str(out), "--protocol", "seen", "--json", str(report)]
    )
    assert r.exit_code == 1 and "needs at least 3 labelled tiles per class" in r.output
    assert "add labelled tiles" in r.output and "images" not in r.output and not report.exists()


def test_a_model_trained_on_a_tta_bundle_records_it_and_asks_for_tta(tmp_path: Path, make_geotiff: MakeGeoTiff) -> None:
    scene = make_geotiff(shape=(3, 512, 512))
    index = tmp_path / "tta"
    invoke("tile", str(scene), "--index", str(index), "--model", "backbone", "--tta", *TEST_BACKBONE, "--workers", "0")
    tiles = Bundle.open(index).tiles()
    labels = gpd.GeoDataFrame(
        {"label": ["a", "a", "b", "b"]}, geometry=tiles.geometry.representative_point().to_numpy(), crs=tiles.crs
    )
    labels.to_file(tmp_path / "labels.gpkg")
    out = tmp_path / "m.pt"
    args = ["--method", "srl", "--epochs", "1", "--test-fraction", "0", "--out", str(out)]
    invoke("train", str(tmp_path / "labels.gpkg"), "--index", str(index), *args)
    assert load_model(out).meta["data"]["features_tta"] is True
    assert "of --tta features (encode with --tta)" in invoke("info", "--model", str(out)).output
    # Tiling with it as trained says nothing; without --tta it says what to pass.
    tile = ["tile", str(scene), "--model", str(out), "--workers", "0", "--device", "cpu"]
    r = CliRunner().invoke(cli, [*tile, "--index", str(tmp_path / "plain")])
    assert r.exit_code == 0 and "was trained on a --tta bundle's features" in r.output and "pass --tta" in r.output
    r = CliRunner().invoke(cli, [*tile, "--index", str(tmp_path / "averaged"), "--tta"])
    assert r.exit_code == 0 and "--tta bundle" not in r.output, r.output
    # A model trained on plain features records nothing of the kind.
    plain_index, gpkg = labelled_bundle(tmp_path / "p", make_geotiff, 512, 2)
    invoke("train", str(gpkg), "--index", str(plain_index), *args[:-1], str(tmp_path / "p.pt"))
    assert "features_tta" not in load_model(tmp_path / "p.pt").meta["data"]


def test_a_missing_label_column_names_the_columns_there(tmp_path: Path, make_geotiff: MakeGeoTiff) -> None:
    index, gpkg = labelled_bundle(tmp_path, make_geotiff, 512, 2)
    gpd.read_file(gpkg).rename(columns={"label": "Label"}).to_file(tmp_path / "cap.gpkg")
    with pytest.raises(DatasetError, match=r"no `label` column \(its columns: Label\); rename `Label` to `label`"):
        bundle_features(tmp_path / "cap.gpkg", Bundle.open(index))


# ----------------------------------------------------------------------------------------------- bad input


def refused(*args: str, code: int):  # type: ignore[no-untyped-def]
    """Run a command that must fail with one message: exit ``code``, no traceback."""
    r = CliRunner().invoke(cli, ["-q", *args])
    assert r.exit_code == code, (r.output, r.exception)
    assert isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output
    return r


def make_folder(root: Path, sizes: dict[str, int]) -> Path:
    """Class folders of small random PNGs, ``sizes[name]`` images each."""
    rng = np.random.default_rng(1)
    for c, n in sizes.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.fixture
def srl_model(image_folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "m.pt"
    invoke(
        "train", str(image_folder), "--method", "srl", "--epochs", "1", "--retain-dim", "0", "--augment", "none",
        "--out", str(out), *TEST_BACKBONE,
    )  # fmt: skip
    return out


def test_train_on_classes_too_small_for_validation_keeps_the_last_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 classes x 6 images: 5 train per class, too few for a validation image; the last epoch is kept."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = make_folder(tmp_path / "ds", {"agricultural": 6, "beach": 6, "forest": 6})
    out = tmp_path / "r.pt"
    r = CliRunner().invoke(
        cli, ["train", str(data), "--out", str(out), "--epochs", "2", "--augment", "none", *TEST_BACKBONE]
    )
    assert r.exit_code == 0, (r.output, r.exception)
    assert "validation" in r.output and "last epoch" in r.output and "7 or more images" in r.output
    meta = load_model(out).meta
    history = meta["history"]
    assert set(history) == {"srl", "dgssh"}
    assert meta["recipe"]["distill"] == 10.0
    assert all(h["best_epoch"] == 2 and h.get("best_val_mAP") is None for h in history.values())


def _png16_rgb(path: Path, rgb: np.ndarray) -> None:
    """Write a 16-bit RGB PNG (PIL writes none): what an export of reflectances gives."""
    import struct
    import zlib

    h, w, _ = rgb.shape
    big = rgb.astype(">u2")
    raw = b"".join(b"\x00" + big[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    head = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def test_image_folders_as_archives_leave_them_are_read_or_refused_by_name(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bb = load_backbone("test")
    beach = image_folder / "class0"
    # A name that is not UTF-8 (unzipped from a Windows archive) and the formats PIL reads train; hidden
    # images are left out, and said to be.
    shutil.copy(beach / "0.png", image_folder / "class1" / os.fsdecode(b"caf\xe9.png"))
    Image.open(beach / "1.png").save(beach / "extra.bmp")
    Image.open(beach / "2.png").save(beach / "extra.webp", lossless=True)
    shutil.copy(beach / "3.png", beach / ".hidden.png")
    with geoir_warnings(caplog):
        data = image_folder_features(image_folder, bb)
    assert len(data.items) == 12 * 4 + 3 and "class0/extra.bmp" in data.items and "class0/extra.webp" in data.items
    assert "1 hidden image(s)" in caplog.text and "class0/.hidden.png" in caplog.text
    assert data.summary()["samples"] == 51
    # A cache file of other features (the right rows, another width) is recomputed, not trained on.
    cached = next(p for p in cache_dir().iterdir() if p.suffix == ".npz")
    np.savez(cached, features=np.zeros((51, 10), np.float32))
    again = image_folder_features(image_folder, bb)
    np.testing.assert_array_equal(again.features, data.features)
    # Refused, each naming the file and the fix, before any model is written:
    cases: list[tuple[Callable[[Path], object], str]] = [
        # a 16-bit RGB PNG, which PIL reads as RGB keeping the high bytes: a near-black image
        (lambda p: _png16_rgb(p / "r.png", np.full((64, 64, 3), 2000, np.uint16)), "r.png has 16-bit RGB pixels"),
        # a 16-bit GeoTIFF, which PIL cannot open ("not a readable image" said nothing of why)
        (lambda p: _write_raster(p / "s.tif", np.zeros((3, 64, 64), np.uint16)), "is a 3-band uint16 raster"),
        (lambda p: (p / "gone.png").symlink_to(tmp_path / "moved.png"), "gone.png is a broken link (to"),
        (lambda p: Image.new("RGB", (200, 200)).save(p / "big.png"), "big.png declares 40,000 pixels, too many"),
    ]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 200 x 200 px is then over twice the limit
    for make, message in cases:
        bad = tmp_path / "bad"
        shutil.copytree(image_folder, bad, symlinks=True)
        make(bad / "class2")
        out = tmp_path / "m.pt"
        r = refused("train", str(bad), "--out", str(out), "--epochs", "1", "--augment", "none", *TEST_BACKBONE,
                    code=1)  # fmt: skip
        assert message in r.output, r.output
        assert not out.exists()
        shutil.rmtree(bad)
    monkeypatch.undo()


def _write_raster(path: Path, data: np.ndarray) -> None:
    import rasterio

    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype) as dst:  # fmt: skip
        dst.write(data)


def test_train_refuses_a_class_too_small_before_reading_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = make_folder(tmp_path / "ds", {"beach": 2, "forest": 6})
    out = tmp_path / "r.pt"
    r = refused("train", str(data), "--out", str(out), *TEST_BACKBONE, code=1)
    assert "'beach' has 2" in r.output and "at least 3 images" in r.output and "--test-fraction 0" in r.output
    assert str(data) in r.output
    assert not out.exists() and not (tmp_path / "cache").exists()  # no image was encoded


def test_train_names_a_small_class_of_labelled_tiles_as_labelled(tmp_path: Path, make_geotiff: MakeGeoTiff) -> None:
    index = tmp_path / "idx"
    scene = make_geotiff(shape=(3, 512, 512))
    invoke("tile", str(scene), "--index", str(index), "--model", "backbone", "--backbone", "test", "--workers", "0")
    tiles = Bundle.open(index).tiles()
    assert len(tiles) == 4
    labels = gpd.GeoDataFrame(
        {"label": ["a", "b", "b", "b"]}, geometry=tiles.geometry.representative_point().to_numpy(), crs=tiles.crs
    )
    gpkg = tmp_path / "labels.gpkg"
    labels.to_file(gpkg)
    out = tmp_path / "m.pt"
    r = refused("train", str(gpkg), "--index", str(index), "--out", str(out), "--device", "cpu", code=1)
    assert "class 'a' has 1" in r.output and "np.int64" not in r.output
    assert "labels.gpkg" in r.output and "`label` column" in r.output and "labelled tiles" in r.output
    assert not out.exists()


@pytest.mark.parametrize("name", ["some.png", "scene.tif"])
def test_train_refuses_an_image_as_data_set(tmp_path: Path, name: str) -> None:
    image = tmp_path / name
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "r.pt"
    for extra in ([], ["--index", str(tmp_path / "idx")]):
        r = refused("train", str(image), "--out", str(out), *extra, *TEST_BACKBONE, code=2)
        assert name in r.output and "not a data set" in r.output and "vector file" not in r.output.split(";")[0]
        assert "folder of class folders" in r.output and "GeoPackage" in r.output and "--index" in r.output
    assert not out.exists() and not (tmp_path / "idx").exists()


def test_train_refuses_a_model_name_without_pt_before_any_work(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "r05.txt"
    r = refused("train", str(image_folder), "--out", str(out), "--epochs", "1", *TEST_BACKBONE, code=2)
    assert "--out" in r.output and ".pt" in r.output and "r05.pt" in r.output
    assert not out.exists() and not cache_dir().exists()
    r = refused("train", str(image_folder), "--out", str(tmp_path / "m.pt"), "--seed", "-1", *TEST_BACKBONE, code=2)
    assert "--seed" in r.output


@pytest.mark.parametrize("option", ["--seeds", "--unseen-seeds"])
@pytest.mark.parametrize("value", ["a,b", "x", "0,,1", "1,-2", "0,0"])
def test_eval_refuses_malformed_seeds(tmp_path: Path, option: str, value: str) -> None:
    (tmp_path / "ds").mkdir()
    report = tmp_path / "r.json"
    r = refused("eval", str(tmp_path / "ds"), "--model", "m.pt", option, value, "--json", str(report), code=2)
    assert option in r.output and "0,1,2" in r.output
    assert not report.exists()


def test_eval_checks_every_protocol_before_any_work(image_folder: Path, srl_model: Path, tmp_path: Path) -> None:
    """4 classes cannot give the unseen protocol's 15 + 2: refused before the seen protocol runs or writes."""
    report, splits = tmp_path / "r.json", tmp_path / "splits"
    args = ("eval", str(image_folder), "--model", str(srl_model), "--json", str(report), "--splits-dir", str(splits))
    r = refused(*args, "--protocol", "seen", "--protocol", "unseen", code=1)
    assert str(image_folder) in r.output and "4 classes" in r.output and "at least 17" in r.output
    assert "--protocol seen" in r.output and "n_train_classes" not in r.output
    assert not report.exists() and not splits.exists()


def test_eval_refuses_to_replace_curves_and_splits_without_overwrite(
    image_folder: Path, srl_model: Path, tmp_path: Path
) -> None:
    report, png, splits = tmp_path / "r.json", tmp_path / "pr.png", tmp_path / "splits"
    args = ["eval", str(image_folder), "--model", str(srl_model), "--protocol", "seen", "--seeds", "0,3"]
    args += ["--json", str(report)]
    png.write_bytes(b"old curve")
    r = refused(*args, "--pr-curve", str(png), code=1)
    assert "pr.png exists" in r.output and "--overwrite" in r.output
    assert png.read_bytes() == b"old curve" and not report.exists()
    splits.mkdir()
    (splits / "seen_seed3.json").write_text("old split")
    r = refused(*args, "--splits-dir", str(splits), code=1)
    assert "seen_seed3.json" in r.output and "--overwrite" in r.output and "--splits-dir" in r.output
    assert sorted(p.name for p in splits.iterdir()) == ["seen_seed3.json"] and not report.exists()
    r = refused(*args, "--splits-dir", str(png / "splits"), code=1)
    assert f"cannot write split files under {png / 'splits'} ({png} is not a folder)" in r.output
    # Split files of other seeds or protocols are no conflict; with --overwrite the old ones are replaced.
    invoke(*args, "--splits-dir", str(splits), "--pr-curve", str(png), "--overwrite")
    assert json.loads((splits / "seen_seed3.json").read_text())["seed"] == 3
    assert Image.open(png).size == (640, 480)


def test_eval_refuses_a_curve_file_that_is_not_png(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    report, curve = tmp_path / "r.json", tmp_path / "x.txt"
    r = refused("eval", str(tmp_path / "ds"), "--json", str(report), "--pr-curve", str(curve), code=2)
    assert "--pr-curve" in r.output and ".png" in r.output and "x.txt" in r.output
    assert not report.exists() and not curve.exists()


def test_eval_refuses_curves_without_the_seen_protocol(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    report, curve = tmp_path / "r.json", tmp_path / "pr.png"
    args = ("eval", str(tmp_path / "ds"), "--json", str(report), "--pr-curve", str(curve), "--protocol", "unseen")
    r = refused(*args, code=2)
    assert "--protocol seen" in r.output
    assert not report.exists() and not curve.exists()


def test_eval_reference_protocol_logs_its_own_figures(image_folder: Path, srl_model: Path, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    r = CliRunner().invoke(
        cli,
        ["eval", str(image_folder), "--model", str(srl_model), "--protocol", "reference", "--seeds", "0",
         "--json", str(report)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    got = json.loads(report.read_text())["protocols"]
    assert set(got) == {"reference"}
    backbone = got["reference"]["backbone float"]["mAP_mean"]
    # What the log says is what the report holds (before, the log showed the seen protocol's figures).
    assert "reference seed 0 backbone float" in r.output and "seen seed" not in r.output
    assert f"{backbone:.4f}" in r.output


def test_eval_json_dash_prints_the_report_on_stdout_and_the_table_on_stderr(
    image_folder: Path, srl_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `--json -` wrote a file named "-" (replacing one there without --overwrite).
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(
        cli, ["-q", "eval", str(image_folder), "--model", str(srl_model), "--protocol", "seen", "--seeds", "0",
              "--json", "-"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["model_file"] == str(srl_model) and set(report["protocols"]) == {"seen"}
    assert "| seen | srl float |" in r.stderr and "| seen |" not in r.stdout
    assert not (tmp_path / "-").exists()


def test_eval_papers_protocols_score_one_head_per_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from geoir.training.protocols import Split, evaluate_seen, stratified_split
    from geoir.training.recipes import code_encoder, float_encoder

    # Colours under heavy noise: the classes overlap, so the protocols rank differently and each figure
    # below pins which database was used.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = colour_folder(tmp_path / "noisy", 150)
    model = tmp_path / "m.pt"
    invoke(
        "train", str(folder), "--method", "combined", "--bits", "16", "--epochs", "2", "--retain-dim", "0",
        "--augment", "none", "--out", str(model), *TEST_BACKBONE,
    )  # fmt: skip
    out = tmp_path / "r.json"
    args = ["--protocol", "seen", "--protocol", "test", "--protocol", "reference", "--seeds", "0"]
    invoke("eval", str(folder), "--model", str(model), *args, "--json", str(out))
    got = json.loads(out.read_text())["protocols"]
    assert list(got) == ["seen", "test", "reference"]
    data = image_folder_features(folder, load_backbone("test", device="cpu"))
    x, y = data.features, data.labels
    split = stratified_split(y, 0.8, 0)
    # The head eval trains on the split (seeded, so the same here), scored by every protocol.
    recipe = Recipe.from_dict(load_model(str(model)).meta["recipe"])
    head, hist = recipe.train(x[split.train], y[split.train], seed=0, keep_codes=True)
    for protocol, database in (("seen", "all"), ("test", "test"), ("reference", "train")):
        for name, enc in (("backbone float", float_encoder(None)), ("combined float", float_encoder(head))):
            want = evaluate_seen(enc, x, y, split, database=database)["mAP"]  # type: ignore[arg-type]
            assert got[protocol][name]["mAP_mean"] == pytest.approx(want, abs=1e-6), (protocol, name)
    want = evaluate_seen(code_encoder(head), x, y, split, metric="hamming", database="test")["mAP"]
    assert got["test"]["combined 16-bit"]["mAP_mean"] == pytest.approx(want, abs=1e-6)
    # Every protocol the scorer knows is offered by the command, and no other.
    from geoir.cli.eval import evaluate as eval_command
    from geoir.training.evaluation import PROTOCOLS

    choices = next(p.type.choices for p in eval_command.params if p.name == "protocol")  # type: ignore[attr-defined]
    assert sorted(choices) == sorted(PROTOCOLS)
    # Protocol T: the test codes against the codes the hash head learned for its training images (V), which
    # are not the network's codes of those images.
    learned, fit = hist["dgssh"]["V"], split.train[np.asarray(hist["dgssh"]["fit_index"])]
    assert np.any(learned != code_encoder(head)(x[fit]))
    t = Split(fit, split.test, 0)
    want = evaluate_seen(code_encoder(head), x, y, t, metric="hamming", database="train", database_codes=learned)["mAP"]
    run = got["reference"]["combined 16-bit"]["runs"][0]
    assert run["mAP"] == pytest.approx(want, abs=1e-6) and "learned" in run["protocol"]
    network = evaluate_seen(code_encoder(head), x, y, split, metric="hamming", database="train")["mAP"]
    assert abs(network - want) > 1e-3
    # The model's history keeps no codes: only eval's own re-training holds them, for protocol T.
    assert "V" not in recipe.train(x[split.train], y[split.train], seed=0)[1]["dgssh"]


def test_eval_shows_one_bar_tick_per_trained_split(image_folder: Path, srl_model: Path) -> None:
    from geoir.training.evaluation import run_protocols

    events: list[object] = []

    class Bar:
        def __init__(self, total: int, label: str, unit: str) -> None:
            events.append(("open", total, unit))

        def update(self, n: int) -> None:
            events.append(n)

        def set_postfix_str(self, s: str) -> None:
            events.append(s)

        def close(self) -> None:
            events.append("close")

    data = image_folder_features(image_folder, load_backbone("test", device="cpu"))
    model = load_model(str(srl_model))
    run_protocols(model, data, ["seen", "test"], [0, 1], [0], log=lambda s: None, progress=Bar)
    # Two seen splits, each trained once for both protocols, the bar naming each; no unseen split was asked for.
    assert events == [("open", 2, "split"), "seen_seed0", 1, "seen_seed1", 1, "close"]


def test_eval_tta_scores_the_averaged_features_that_tile_tta_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from geoir.training.protocols import evaluate_seen, stratified_split
    from geoir.training.recipes import float_encoder

    # Two colours x two stripe directions: averaging over quarter turns cannot tell the directions apart,
    # so the averaged backbone ranks differently from the single view.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    image_folder = tmp_path / "stripes"
    rng = np.random.default_rng(0)
    for c in range(4):
        (image_folder / f"class{c}").mkdir(parents=True)
        for i in range(12):
            img = np.clip(np.array([(200, 60, 60), (60, 60, 200)][c % 2]) + rng.normal(0, 30, (64, 64, 3)), 0, 255)
            img[(np.arange(64) // 4 % 2 == 0)] *= 0.3  # horizontal stripes
            Image.fromarray(img.astype(np.uint8).transpose(1, 0, 2) if c >= 2 else img.astype(np.uint8)).save(
                image_folder / f"class{c}" / f"{i}.png"
            )
    model = tmp_path / "m.pt"
    invoke("train", str(image_folder), "--method", "srl", "--epochs", "2", "--out", str(model), *TEST_BACKBONE)
    reports = {}
    for flag in ("", "--tta"):
        out = tmp_path / f"r{flag}.json"
        args = ["--model", str(model), "--protocol", "seen", "--seeds", "0", "--json", str(out)]
        invoke("eval", str(image_folder), *args, *([flag] if flag else []))
        reports[flag] = json.loads(out.read_text())
    assert reports["--tta"]["tta"] is True and reports[""]["tta"] is False
    # The backbone's figures under --tta are those of the features an averaging backbone (geoir tile --tta)
    # computes, image by image; and they are not the single view's.
    bb = load_backbone("test", device="cpu")
    bb.tta = True
    data = image_folder_features(image_folder, bb)
    split = stratified_split(data.labels, 0.8, 0)
    want = evaluate_seen(float_encoder(None), data.features, data.labels, split, database="all")["mAP"]
    got = {k: r["protocols"]["seen"]["backbone float"]["mAP_mean"] for k, r in reports.items()}
    assert got["--tta"] == pytest.approx(want, abs=1e-6)
    assert got[""] != pytest.approx(want, abs=1e-3)


def test_eval_expand_scores_rankings_after_query_expansion(image_folder: Path, srl_model: Path, tmp_path: Path) -> None:
    from geoir.training.protocols import evaluate_seen, stratified_split
    from geoir.training.recipes import float_encoder

    out = tmp_path / "r.json"
    args = ["--model", str(srl_model), "--protocol", "seen", "--seeds", "0", "--json", str(out)]
    invoke("eval", str(image_folder), *args, "--expand", "3")
    report = json.loads(out.read_text())
    assert report["expand"] == 3
    # The backbone's figure is the expanded ranking's, as geoir.training.metrics computes it.
    data = image_folder_features(image_folder, load_backbone("test", device="cpu"))
    split = stratified_split(data.labels, 0.8, 0)
    want = evaluate_seen(float_encoder(None), data.features, data.labels, split, database="all", expand=3)["mAP"]
    assert report["protocols"]["seen"]["backbone float"]["mAP_mean"] == pytest.approx(want, abs=1e-6)
    assert 0 <= report["protocols"]["seen"]["srl float"]["mAP_mean"] <= 1
    r = invoke("eval", str(image_folder), *args, "--expand", "-2", "--overwrite", code=2)
    assert "--expand" in r.output


def test_train_refuses_index_with_an_image_folder(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    r = invoke("train", str(image_folder), "--index", str(tmp_path / "idx"), "--out", str(out), *TEST_BACKBONE, code=2)
    assert "--index is for a vector file of labelled geometries" in r.output and "leave --index out" in r.output
    assert not out.exists()


def test_cli_defaults_are_the_recipes() -> None:
    # `geoir train` with no options trains Recipe(), the shipped model's recipe (both read geoir.training.defaults).
    from geoir.cli.train import train

    defaults = {p.name: p.default for p in train.params}
    r = Recipe()
    assert defaults["method"] == r.method and int(defaults["bits"]) == r.bits
    assert defaults["retain_dim"] == r.retain_dim and defaults["distill"] == r.distill
    assert defaults["retain_gate"] is r.retain_gate and defaults["fuse_codes"] is r.fuse_codes
    assert defaults["refit"] == r.refit == "codes"
    # ... and the shipped model file was trained with it (docs/training.md's command): codes re-trained on
    # every training image of its split, the float embedding as validation chose it.
    shipped = load_model("default").meta
    assert Recipe.from_dict(shipped["recipe"]) == r
    n_train = shipped["data"]["samples"] - len(shipped["split"]["test_items"])
    assert shipped["history"]["dgssh"]["refit"]["items"] == n_train and "refit" not in shipped["history"]["srl"]


def test_info_describes_the_shipped_model_and_refuses_what_is_no_model_file(tmp_path: Path) -> None:
    model = load_model("default")
    text = invoke("info", "--model", "default").output
    assert f"fingerprint {model.fingerprint[:12]}" in text
    assert f"{model.embedding_dim}-d float embedding, {model.bits}-bit codes" in text
    for part, h in model.meta["history"].items():
        assert f"validation  {part}: mAP {h['best_val_mAP']:.3f} at epoch {h['best_epoch']}" in text
    r = invoke("info", "--model", str(tmp_path / "gone.pt"), code=1)
    assert "gone.pt not found" in r.output
    r = invoke("info", "--model", "backbone", code=2)
    assert "'backbone' is no model file" in r.output
    # The model as the argument: a .pt file or 'default', described as --model describes it.
    assert invoke("info", "default").output == text
    r = invoke("info", str(tmp_path / "gone.pt"), code=1)
    assert "gone.pt not found" in r.output
    r = invoke("info", "default", "--model", "default", code=2)
    assert "both name what to describe" in r.output
    r = invoke("info", "backbone", code=2)
    assert "'backbone' is no model file" in r.output and "[BUNDLE|MODEL]" in r.output


def test_images_in_sub_folders_of_a_class_are_named_as_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """They were skipped without a word (75 samples counted of 76)."""

    from geoir.training.data import list_image_folder

    root = make_folder(tmp_path / "data", {"a": 2, "b": 2})
    for sub in ("a/sub", "a/.hidden", "b/x/y"):
        (root / sub).mkdir(parents=True)
    img = next((root / "a").glob("*.png"))
    for dest in ("a/sub/n.png", "a/.hidden/h.png", "b/x/y/deep.png"):
        (root / dest).write_bytes(img.read_bytes())
    with caplog.at_level(logging.WARNING, logger="geoir"):
        paths, _, classes = list_image_folder(root)
    assert classes == ["a", "b"] and len(paths) == 4
    assert "2 image(s) in sub-folders of class folders are left out" in caplog.text and "move them up" in caplog.text


def test_data_set_images_must_be_8_bit_and_hidden_files_are_left_out(image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "class0" / "._0.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS metadata
    out = tmp_path / "m.pt"
    invoke("train", str(image_folder), "--method", "srl", "--epochs", "1", "--out", str(out), *TEST_BACKBONE)
    assert load_model(out).meta["data"]["samples"] == 48
    # A 16-bit image would be clipped to white by an RGB conversion: refused, naming the file.
    Image.fromarray(np.full((32, 32), 3000, np.uint16)).save(image_folder / "class1" / "deep.png")
    r = CliRunner().invoke(
        cli, ["train", str(image_folder), "--out", str(tmp_path / "n.pt"), "--epochs", "1", *TEST_BACKBONE]
    )
    assert r.exit_code == 1 and "deep.png has I;16 pixels, not 8-bit" in r.output, r.output


def test_a_damaged_or_unwritable_feature_cache_is_worked_around(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bb = load_backbone("test")
    first = image_folder_features(image_folder, bb)
    (cached,) = cache_dir().iterdir()
    cached.write_bytes(cached.read_bytes()[:100])  # truncated
    again = image_folder_features(image_folder, bb)
    np.testing.assert_array_equal(again.features, first.features)
    assert "is damaged" in caplog.text and np.load(cached)["features"].shape == first.features.shape
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    third = image_folder_features(image_folder, bb)
    np.testing.assert_array_equal(third.features, first.features)
    assert "cannot write the feature cache" in caplog.text


def test_label_files_without_usable_labels_or_features_are_named(tmp_path: Path, make_geotiff: MakeGeoTiff) -> None:
    index = tmp_path / "idx"
    scene = make_geotiff(shape=(3, 512, 512))
    invoke("tile", str(scene), "--index", str(index), "--model", "backbone", "--backbone", "test", "--workers", "0")
    other = make_geotiff("o.tif", shape=(3, 512, 512), bounds=(510_000.0, 4_000_000.0, 515_120.0, 4_005_120.0))
    invoke("tile", str(other), "--index", str(index), "--no-encode")
    tiles = Bundle.open(index).tiles()
    o_id = next(r["id"] for r in Bundle.open(index).scene_records() if r["path"] == str(other))
    centres = tiles.geometry.representative_point()
    csv = tmp_path / "t.csv"
    csv.write_text("label,x\na,1\n")
    nulls = tmp_path / "nulls.gpkg"
    gpd.GeoDataFrame({"label": [None, None]}, geometry=centres.to_numpy()[:2], crs=tiles.crs).to_file(nulls)
    unencoded = tmp_path / "unencoded.gpkg"
    on_other = centres[tiles.scene_id == o_id].to_numpy()
    gpd.GeoDataFrame({"label": ["a", "b", "a", "b"]}, geometry=on_other, crs=tiles.crs).to_file(unencoded)
    for labels, message in (
        (csv, "has no geometries"),
        (nulls, "has no geometry with a `label`"),
        (unencoded, "the 4 tiles under the labels of"),
    ):
        r = CliRunner().invoke(cli, ["train", str(labels), "--index", str(index), "--out", str(tmp_path / "m.pt")])
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / "m.pt").exists()


def test_models_on_weights_from_a_file_are_described_and_evaluated_with_them(
    image_folder: Path, tmp_path: Path
) -> None:
    # Weights of the test backbone from a file (not the packaged ones): the model records them by fingerprint.
    weights = tmp_path / "w.pth"
    torch.save({k: v + 0.01 for k, v in load_backbone("test").model.state_dict().items()}, weights)
    out = tmp_path / "m.pt"
    args = ["--epochs", "1", "--backbone", "test", "--weights", str(weights), "--device", "cpu"]
    invoke("train", str(image_folder), "--method", "srl", "--out", str(out), *args)
    r = CliRunner().invoke(cli, ["info", "--model", str(out)])
    assert r.exit_code == 1 and "--weights" in r.output
    assert "fingerprint" in invoke("info", "--model", str(out), "--weights", str(weights)).output
    report = tmp_path / "r.json"
    eval_args = ["--protocol", "test", "--seeds", "0", "--json", str(report), "--weights", str(weights)]
    invoke("eval", str(image_folder), "--model", str(out), *eval_args)
    assert json.loads(report.read_text())
    assert "--model FILE" not in invoke("train", "--help").output
    # The test backbone's alias names the backbone the model records; another backbone is refused.
    enc = tmp_path / "e.npz"
    png = next((image_folder / "class0").iterdir())
    invoke("encode", str(png), "--model", str(out), "--backbone", "test", "--weights", str(weights), "--out", str(enc))
    r = CliRunner().invoke(
        cli, ["encode", str(png), "--model", str(out), "--backbone", "resnet18", "--out", str(enc) + ".npy"]
    )
    assert r.exit_code == 1 and "trained on backbone test_efficientnet, not resnet18" in r.output
