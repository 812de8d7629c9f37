"""Bad input to `geoir tile` and `geoir encode`, and damaged bundles: one clear message, the right exit
code, no traceback, and nothing half-written."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest
from click.testing import CliRunner, Result

from geoir.cli import cli
from geoir.errors import BundleError, GeoirError, SceneError, user_message
from geoir.index.bundle import Bundle, discard_if_unused
from geoir.io.scene import expand_inputs, open_scene
from tests.conftest import MakeGeoTiff, editing_catalog, geoir_warnings, truncated

BACKBONE = ["--model", "backbone", "--backbone", "test", "--device", "cpu"]


def geoir(*args: str) -> Result:
    return CliRunner().invoke(cli, ["-q", *args])


def assert_clean_error(r: Result, code: int, *needles: str) -> None:
    """Exit ``code`` through click (no traceback), a one-line message holding every needle."""
    assert r.exit_code == code, r.output
    assert isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output
    for needle in needles:
        assert needle in r.output, r.output


@pytest.mark.parametrize("workers", ["0", "1"])
def test_truncated_scene_fails_cleanly_and_leaves_no_bundle(
    make_geotiff: MakeGeoTiff, tmp_path: Path, workers: str
) -> None:
    cut = truncated(make_geotiff, tmp_path)
    index = tmp_path / "idx"
    r = geoir("tile", str(cut), "--index", str(index), "--workers", workers, *BACKBONE)
    # With reader processes too, the message is the reader's own, not torch's worker traceback.
    assert_clean_error(r, 1, str(cut), "truncated or damaged")
    assert "DataLoader" not in r.output
    assert not index.exists()


@pytest.mark.parametrize("workers", ["0", "1"])
def test_skip_unreadable_leaves_bad_files_out_and_tiles_the_rest(
    make_geotiff: MakeGeoTiff, tmp_path: Path, workers: str
) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    good = make_geotiff("archive/a_good.tif", shape=(3, 512, 512))
    cut = truncated(make_geotiff, archive, "b_cut.tif")  # fails on its second row of tiles, chips of its first made
    (archive / "c_notes.tif").write_text("not a raster")
    index, chips = tmp_path / "idx", tmp_path / "chips"
    args = ["tile", str(archive), "--index", str(index), "--workers", workers, "--batch-size", "1", *BACKBONE]
    # Without the flag the first unreadable file stops the run before any work.
    assert_clean_error(geoir(*args, "--export-chips", str(chips)), 1, "c_notes.tif is not a raster")
    assert not index.exists() and not chips.exists()
    r = CliRunner().invoke(cli, [*args, "--export-chips", str(chips), "--skip-unreadable"])
    assert r.exit_code == 0, r.output
    assert "skipped: " in r.output and f"{cut}: the pixels at" in r.output and "c_notes.tif is not a raster" in r.output
    assert "1 scene(s) added" in r.output and "2 unreadable file(s) left out: c_notes.tif, b_cut.tif" in r.output
    bundle = Bundle.open(index)
    assert [s["path"] for s in bundle.scene_records()] == [str(good)]
    assert len(bundle.tiles()) == 4 and len(bundle.vectors()["ids"]) == 4
    assert sorted(p.name[:6] for p in chips.glob("*.tif")) == ["a_good"] * 4  # none of b_cut's first row is left


def test_skip_unreadable_with_nothing_readable_fails_and_leaves_nothing(
    make_geotiff: MakeGeoTiff, tmp_path: Path
) -> None:
    import geoir as api

    cut = truncated(make_geotiff, tmp_path)
    notes = tmp_path / "notes.tif"
    notes.write_text("not a raster")
    index, chips = tmp_path / "idx", tmp_path / "out" / "chips"
    for files in ([notes], [cut, notes]):
        r = geoir("tile", *map(str, files), "--index", str(index), "--skip-unreadable", "--workers", "0",
                  "--batch-size", "1", "--export-chips", str(chips), *BACKBONE)  # fmt: skip
        assert_clean_error(r, 1, f"none of the {len(files)} file(s) given could be read")
        assert not index.exists() and not (tmp_path / "out").exists()
    with pytest.raises(SceneError, match="none of the 2 file"):
        api.tile([cut, notes], index=index, model=api.load_model("backbone", backbone="test"), skip_unreadable=True)
    assert not index.exists()
    report = api.tile([cut, notes, make_geotiff()], index=index, encode=False, skip_unreadable=True)
    assert [Path(p).name for p, _ in report.unreadable] == ["notes.tif", "cut.tif"] and len(report.added_scenes) == 1


def test_failed_run_empties_a_given_empty_directory_and_keeps_it(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    index = tmp_path / "idx"
    index.mkdir()
    r = geoir("tile", str(truncated(make_geotiff, tmp_path)), "--index", str(index), "--workers", "0", *BACKBONE)
    assert r.exit_code == 1
    assert index.is_dir() and list(index.iterdir()) == []


def test_bad_index_kind_is_refused_before_any_tile(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    index = tmp_path / "idx"
    r = geoir("tile", str(make_geotiff()), "--index", str(index), "--index-kind", "FOO99", *BACKBONE)
    assert_clean_error(r, 2, "--index-kind", "FOO99", "valid float examples")
    assert "faiss::" not in r.output and ".cpp" not in r.output
    assert not index.exists()
    # A binary kind for a model without codes is refused too.
    r = geoir("tile", str(make_geotiff()), "--index", str(index), "--index-kind", "BHNSW32", *BACKBONE)
    assert_clean_error(r, 2, "gives no hash codes")
    assert not index.exists()


def test_tiles_larger_than_the_scene_leave_no_empty_bundle(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    index = tmp_path / "idx"
    r = geoir("tile", str(make_geotiff(shape=(3, 256, 256))), "--index", str(index), "--size", "2048", *BACKBONE)
    assert_clean_error(r, 1, "no tile of scene.tif", "--size", "--max-nodata")
    assert not index.exists()


def test_missing_catalog_is_named_and_the_vectors_survive(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    index = tmp_path / "idx"
    assert geoir("tile", str(make_geotiff()), "--index", str(index), "--workers", "0", *BACKBONE).exit_code == 0
    vectors = sorted((index / "vectors").iterdir())
    (index / "catalog.gpkg").unlink()
    for args in (["encode", "--index", str(index)], ["info", "--index", str(index)]):
        assert_clean_error(geoir(*args), 1, "catalog.gpkg is missing", "restore")
    # Before, a repair by `geoir encode` took the vectors for orphans and deleted them.
    assert sorted((index / "vectors").iterdir()) == vectors
    with pytest.raises(BundleError, match="records 1 scene"):
        Bundle.open(index)


def test_scene_gone_since_tiling_is_named_without_worker_traceback(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    scene = make_geotiff(name="gone.tif")
    index = tmp_path / "idx"
    assert geoir("tile", str(scene), "--index", str(index), "--no-encode").exit_code == 0
    scene.unlink()
    r = geoir("encode", "--index", str(index), "--workers", "1", *BACKBONE)
    assert_clean_error(r, 1, "gone.tif can no longer be read", "geoir remove gone.tif --index")
    assert "DataLoader" not in r.output and "Original Traceback" not in r.output
    # A path that is no local file is not handed to GDAL: a received catalog's /vsicurl/ path would be fetched.
    with editing_catalog(index) as con:
        (record,) = con.execute("SELECT record FROM scenes").fetchone()
        url = "/vsicurl/http://127.0.0.1:9/gone.tif"
        con.execute("UPDATE scenes SET path = ?, record = ?", (url, json.dumps({**json.loads(record), "path": url})))
    with mock.patch("rasterio.open", side_effect=AssertionError("GDAL was asked to open it")):
        r = geoir("encode", "--index", str(index), "--workers", "0", *BACKBONE)
    assert_clean_error(r, 1, f"{url} can no longer be read (no such file here)")


def test_model_and_weights_files_of_garbage_get_a_short_reason(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x03not a model at all" * 50)
    index = tmp_path / "idx"
    model = geoir("tile", str(make_geotiff()), "--index", str(index), "--model", str(junk))
    assert_clean_error(model, 1, str(junk), "damaged, or not a PyTorch file", "geoir train")
    weights = geoir("tile", str(make_geotiff()), "--index", str(index), "--model", "backbone", "--weights", str(junk))
    assert_clean_error(weights, 1, str(junk), "damaged, or not a PyTorch file")
    for r in (model, weights):
        # torch's own advice (load it unsafely, file a torch issue) is not for geoir's users.
        assert "weights_only" not in r.output and "file an issue" not in r.output
    assert not index.exists()


def _edited_default_model(tmp_path: Path, name: str, edit: Callable[[dict], object]) -> Path:
    import copy

    import torch

    from geoir.encoding.model import default_model_path

    payload = copy.deepcopy(torch.load(default_model_path(), weights_only=True))
    edit(payload)
    out = tmp_path / f"{name}.pt"
    torch.save(payload, out)
    return out


@pytest.mark.parametrize(
    ("name", "edit", "reason"),
    [
        ("no_backbone", lambda p: p.pop("backbone"), "no backbone description"),
        ("taps", lambda p: p["backbone"].update(taps=5), "taps are not a list"),
        ("head_list", lambda p: p.update(head_config=[1, 2]), "config is not a mapping"),
        ("no_weights", lambda p: p.update(head_state=None), "a head without weights"),
        ("meta", lambda p: p.update(meta="x"), "(meta) is not a mapping"),
        ("input", lambda p: p["backbone"]["preprocess"].update(input_size=[3, 100_000, 100_000]), "an input size of"),
        # A layer of 10^12 x 1792 floats: sized on the meta device against the weights, never allocated.
        ("huge", lambda p: p["head_config"].update(embed_dim=10**12), "weights do not fit head"),
        ("negative", lambda p: p["head_config"].update(embed_dim=-5), "bad config for head"),
    ],
)
def test_a_damaged_or_edited_model_file_is_named_not_a_traceback(
    tmp_path: Path, name: str, edit: Callable[[dict], object], reason: str
) -> None:
    """Model files with the right format tag but edited fields ended in KeyError/TypeError tracebacks, and
    an 18 kB file could ask for a 21 GB head before its weights were compared."""
    path = _edited_default_model(tmp_path, name, edit)
    r = geoir("info", str(path))
    assert_clean_error(r, 1, str(path), reason)


def test_model_metadata_cannot_forge_lines_of_info(tmp_path: Path) -> None:
    """A newline or a terminal escape in a received model's name was printed raw by `geoir info`."""
    path = _edited_default_model(tmp_path, "named", lambda p: p["meta"].update(name="ok\x1b[2J\nmodel       trusted"))
    bad_history = _edited_default_model(
        tmp_path, "hist", lambda p: p["meta"].update(history={"srl": {"best_val_mAP": "high"}})
    )
    r = geoir("info", str(path))
    assert r.exit_code == 0 and r.output.splitlines()[0].startswith("model       ok\\x1b[2J\\nmodel       trusted")
    assert sum(line.startswith("model ") for line in r.output.splitlines()) == 1
    r = geoir("info", str(bad_history))
    assert r.exit_code == 0 and "meta        (not as geoir writes it" in r.output, r.output


def test_raster_without_crs_gives_its_message_without_rasterio_warnings(
    make_geotiff: MakeGeoTiff, tmp_path: Path
) -> None:
    plain = make_geotiff(name="plain.tif", crs=None)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SceneError, match="has no CRS"):
        warnings.simplefilter("always")
        open_scene(plain)
    assert [w for w in caught if "georeferenc" in str(w.message).lower()] == []


def test_plain_image_without_crs_or_geotransform_gets_the_whole_fix(tmp_path: Path) -> None:
    import numpy as np
    import rasterio

    plain = tmp_path / "plain.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(plain, "w", driver="GTiff", width=8, height=8, count=3, dtype="uint8") as dst:
            dst.write(np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(SceneError, match=r"no CRS and no geotransform.*-a_srs EPSG:XXXX -a_ullr ULX ULY LRX LRY"):
        open_scene(plain)


def test_unreadable_file_reasons_are_short() -> None:
    import pickle

    from geoir.errors import unreadable_file_reason

    zip_error = RuntimeError(
        "PytorchStreamReader failed reading zip archive: failed finding central directory. This is an internal "
        "miniz error. If you are seeing this error, there is a high likelihood that your checkpoint file is corrupted"
    )
    assert unreadable_file_reason(zip_error) == "truncated or damaged: not a whole PyTorch file"
    assert unreadable_file_reason(KeyError(101)) == "damaged, or not a PyTorch file"  # a text file
    assert unreadable_file_reason(pickle.UnpicklingError("invalid load key, 'x'.")) == "damaged, or not a PyTorch file"
    assert unreadable_file_reason(OSError("Permission denied. Check it.")) == "Permission denied"


def test_user_message_strips_the_dataloader_wrapper() -> None:
    wrapped = SceneError(
        "Caught SceneError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise SceneError(msg)\ngeoir.errors.SceneError: a.tif can no longer be read'
    )
    assert user_message(wrapped) == "a.tif can no longer be read"
    assert user_message(SceneError("plain message")) == "plain message"


def test_discard_if_unused_removes_only_what_the_failed_run_created(tmp_path: Path) -> None:
    new = tmp_path / "new"
    with pytest.raises(KeyboardInterrupt), discard_if_unused(new):
        Bundle.open_or_create(new, None)
        raise KeyboardInterrupt  # Ctrl-C before the first scene is committed
    assert not new.exists()
    # An existing bundle is never touched, even empty.
    kept = tmp_path / "kept"
    Bundle.open_or_create(kept, None)
    with pytest.raises(GeoirError), discard_if_unused(kept):
        raise GeoirError("boom")
    assert (kept / "manifest.json").exists()
    # A new bundle that holds tiles when the run fails keeps them: every committed scene is whole.
    partial = tmp_path / "partial"
    with pytest.raises(GeoirError), discard_if_unused(partial):
        b = Bundle.open_or_create(partial, None)
        b.manifest["counts"] = {"scenes": 1, "tiles": 4}
        b.write_manifest()
        raise GeoirError("second scene failed")
    assert json.loads((partial / "manifest.json").read_text())["counts"]["tiles"] == 4


def test_truncated_image_query_gives_gdal_reason(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    out = tmp_path / "v.npy"
    r = geoir("encode", str(truncated(make_geotiff, tmp_path)), "--out", str(out), *BACKBONE)
    # GDAL's reason, not rasterio's "Read failed. See previous exception" (which is never shown).
    assert_clean_error(r, 1, "cut.tif cannot be read as an image", "truncated or damaged")
    assert "previous exception" not in r.output
    assert not out.exists()


def test_api_tile_removes_the_new_bundle_of_a_failed_run(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    import geoir
    from geoir.encoding.model import load_model

    index = tmp_path / "idx"
    model = load_model("backbone", backbone="test")
    with pytest.raises(SceneError, match="truncated or damaged"):
        geoir.tile([truncated(make_geotiff, tmp_path)], index=index, model=model)
    assert not index.exists()


def test_index_kind_too_large_for_the_first_scene_is_refused_up_front(
    make_geotiff: MakeGeoTiff, tmp_path: Path
) -> None:
    index = tmp_path / "idx"
    scene = make_geotiff(shape=(3, 512, 512))  # 4 tiles of 256 px
    r = geoir("tile", str(scene), "--index", str(index), "--index-kind", "IVF64,Flat", *BACKBONE)
    assert_clean_error(r, 2, "--index-kind", "needs at least 64", "gives at most 4", "fewer lists")
    assert not index.exists()
    # A kind the first scene can train is accepted.
    ok = geoir("tile", str(scene), "--index", str(index), "--index-kind", "IVF2,Flat", "--workers", "0", *BACKBONE)
    assert ok.exit_code == 0, ok.output


def test_a_failed_encode_leaves_no_output_folder_and_a_good_one_makes_it(
    make_geotiff: MakeGeoTiff, tmp_path: Path
) -> None:
    out = tmp_path / "new" / "sub" / "v.npy"
    r = geoir("encode", str(truncated(make_geotiff, tmp_path)), "--out", str(out), *BACKBONE)
    assert_clean_error(r, 1, "cut.tif")
    assert not (tmp_path / "new").exists()  # the output's folders are made by the writer, not the checks
    r = geoir("encode", str(make_geotiff()), "--out", str(out), *BACKBONE)
    assert r.exit_code == 0, r.output
    assert out.is_file() and sorted(p.name for p in out.parent.iterdir()) == ["v.npy"]


def test_an_output_under_a_file_is_refused_before_any_work(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = geoir("encode", str(make_geotiff()), "--out", str(blocker / "sub" / "v.npy"), *BACKBONE)
    assert_clean_error(r, 1, "cannot write the folder of v.npy", f"{blocker} is not a folder")


def test_written_files_follow_the_umask_and_keep_the_mode_of_those_they_replace(
    make_geotiff: MakeGeoTiff, tmp_path: Path
) -> None:
    """Every file was forced to 0644: under umask 077 a user's search results and bundle were readable by
    all, and a 0600 GeoPackage given another search came out 0644."""
    old = os.umask(0o077)
    try:
        index, out = tmp_path / "idx", tmp_path / "hits.gpkg"
        chips = tmp_path / "chips"
        r = geoir("tile", str(make_geotiff()), "--index", str(index), "--export-chips", str(chips), *BACKBONE)
        assert r.exit_code == 0, r.output
        tid = str(int(Bundle.open(index).tiles().tile_id[0]))
        assert geoir("search", f"tile:{tid}", "--index", str(index), "--out", str(out), *BACKBONE).exit_code == 0
        written = [p for p in [*index.rglob("*"), *chips.iterdir(), out] if p.is_file() and p.name[0] != "."]
        assert {p.suffix for p in written} >= {".json", ".gpkg", ".faiss", ".npz", ".tif"}
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: "0o600" for p in written}
    finally:
        os.umask(old)
    # Under the usual umask, a file replaced keeps its own mode: 0640 stays 0640.
    out.chmod(0o640)
    r = geoir("search", f"tile:{tid}", "--index", str(index), "--out", str(out), "--layer", "again", *BACKBONE)
    assert r.exit_code == 0 and out.stat().st_mode & 0o777 == 0o640
    (index / "float.faiss").chmod(0o640)
    assert geoir("tile", str(make_geotiff("b.tif", seed=4)), "--index", str(index), *BACKBONE).exit_code == 0
    assert (index / "float.faiss").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("damage", ["rows", "huge"])
def test_vector_files_edited_to_lie_are_named_not_a_traceback(
    make_geotiff: MakeGeoTiff, tmp_path: Path, damage: str
) -> None:
    """A vectors file whose arrays disagree, or whose header declares a huge array, ended in a ValueError or
    MemoryError traceback."""
    import io
    import zipfile

    import numpy as np

    index = tmp_path / "idx"
    assert geoir("tile", str(make_geotiff()), "--index", str(index), *BACKBONE).exit_code == 0
    (vec,) = (index / "vectors").iterdir()
    with np.load(vec) as z:
        arrays = {k: z[k] for k in z.files}
    if damage == "rows":
        arrays["embedding"] = arrays["embedding"][:2]
        np.savez(vec, **arrays)
    else:
        with zipfile.ZipFile(vec, "w") as z:
            for k, a in arrays.items():
                buf = io.BytesIO()
                if k == "features":  # 4 x 10^11 float16, 800 GB, in a member of a few bytes
                    np.lib.format.write_array_header_1_0(
                        buf, {"descr": "<f2", "fortran_order": False, "shape": (4, 10**11)}
                    )
                    buf.write(b"\0" * 64)
                else:
                    np.save(buf, a)
                z.writestr(f"{k}.npy", buf.getvalue())
    (index / "float.faiss").unlink()  # rebuilt from the vectors files
    tid = str(int(Bundle.open(index).tiles().tile_id[0]))
    r = geoir("search", f"tile:{tid}", "--index", str(index), "--out", str(tmp_path / "h.gpkg"), *BACKBONE)
    assert_clean_error(r, 1, f"{vec} is corrupt", "geoir encode --index")


def test_a_received_vrt_cannot_make_geoir_fetch_a_url(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    """A VRT query or examples file naming a /vsicurl/ source had GDAL send requests to that server (a beacon
    telling whoever made the file when and where it was opened) before the command failed."""
    import http.server
    import threading

    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            requests.append(self.requestline)
            self.send_response(404)
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"/vsicurl/http://127.0.0.1:{server.server_port}"
    try:
        index = tmp_path / "idx"
        assert geoir("tile", str(make_geotiff()), "--index", str(index), *BACKBONE).exit_code == 0
        raster = tmp_path / "q.vrt"
        raster.write_text(
            '<VRTDataset rasterXSize="64" rasterYSize="64"><SRS>EPSG:32618</SRS>'
            "<GeoTransform>500000,10,0,4005120,0,-10</GeoTransform>"
            f'<VRTRasterBand dataType="Byte" band="1"><SimpleSource><SourceFilename>{url}/q.tif</SourceFilename>'
            "<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand></VRTDataset>"
        )
        vector = tmp_path / "examples.vrt"
        vector.write_text(
            f'<OGRVRTDataSource><OGRVRTLayer name="a"><SrcDataSource>{url}/a.geojson</SrcDataSource>'
            "</OGRVRTLayer></OGRVRTDataSource>"
        )
        env = {k: v for k, v in os.environ.items() if k != "CPL_VSIL_CURL_ALLOWED_EXTENSIONS"}
        for query in ([str(raster)], ["--examples", str(vector)]):
            args = ["-m", "geoir", "-q", "search", *query, "--index", str(index), "--out", "-", *BACKBONE]
            r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)
            assert r.returncode == 1 and r.stderr.startswith("Error: "), r.stderr
        assert requests == []
        # The variable is the user's to set: with it, GDAL may fetch (the server was reachable all along).
        env["CPL_VSIL_CURL_ALLOWED_EXTENSIONS"] = ".tif"
        args = ["-m", "geoir", "-q", "search", str(raster), "--index", str(index), "--out", "-", *BACKBONE]
        subprocess.run([sys.executable, *args], capture_output=True, env=env, timeout=300)
        assert requests and "q.tif" in requests[0]
    finally:
        server.shutdown()


def test_atomic_target_removes_its_temp_file_and_the_folders_it_made(tmp_path: Path) -> None:
    from geoir.io.files import atomic_target, atomic_write_text

    (tmp_path / "a").mkdir()
    target = tmp_path / "a" / "b" / "c" / "out.json"
    with pytest.raises(KeyboardInterrupt), atomic_target(target) as tmp:
        assert tmp.suffix == ".json" and tmp.parent == target.parent and tmp.parent.is_dir()
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert list((tmp_path / "a").iterdir()) == []  # b/ and b/c/ were made here, and removed; a/ was not
    atomic_write_text(target, "{}")
    assert target.read_text() == "{}" and sorted(p.name for p in target.parent.iterdir()) == ["out.json"]
    assert target.stat().st_mode & 0o777 == 0o644
    # An existing file is replaced whole, or not at all.
    with pytest.raises(RuntimeError), atomic_target(target) as tmp:
        tmp.write_text("{partial")
        raise RuntimeError
    assert target.read_text() == "{}" and sorted(p.name for p in target.parent.iterdir()) == ["out.json"]
    # A GeoPackage whose write failed can leave SQLite's journal beside it (GDAL of pyogrio 0.7 on a full disk).
    with pytest.raises(OSError), atomic_target(target.with_suffix(".gpkg")) as tmp:
        tmp.write_bytes(b"SQLite format 3\0")
        tmp.with_name(tmp.name + "-journal").write_bytes(b"\0")
        raise OSError(28, "No space left on device")
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_a_killed_writers_temp_file_is_removed_by_the_next_write_of_its_target(tmp_path: Path) -> None:
    from geoir.io.files import atomic_write_text

    target = tmp_path / "hits.gpkg"
    # A real SIGKILL in the middle of a write: its temp file stays behind.
    killed = (
        "import os, signal, sys\nfrom pathlib import Path\nfrom geoir.io.files import atomic_target\n"
        "with atomic_target(Path(sys.argv[1])) as tmp:\n    tmp.write_text('half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    for _ in range(2):
        assert subprocess.run([sys.executable, "-c", killed, str(target)]).returncode == -signal.SIGKILL
    left = sorted(tmp_path.glob(".hits.gpkg.*.tmp.gpkg"))
    assert len(left) == 2
    old = time.time() - 120
    os.utime(left[0], (old, old))
    # Another target's, one of a running writer (this one) and the recent one (maybe a writer on another machine
    # sharing the folder, whose pid means nothing here) are kept.
    other = tmp_path / f".hits.gpkg.x.{os.getpid()}.0123abcd.tmp.gpkg"
    mine = tmp_path / f".hits.gpkg.{os.getpid()}.0123abcd.tmp.gpkg"
    for f in (other, mine):
        f.write_text("")
        os.utime(f, (old, old))
    atomic_write_text(target, "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, left[1].name, other.name, mine.name])


def test_a_failed_api_tile_never_empties_a_folder_that_is_not_a_bundle(
    make_geotiff: MakeGeoTiff, tmp_path: Path
) -> None:
    import geoir

    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "thesis.txt").write_text("important")
    (precious / "sub" / "data.csv").write_text("x")
    with pytest.raises(BundleError, match="exists and is not a geoir bundle"):
        geoir.tile([str(make_geotiff())], index=precious, encode=False)
    assert (precious / "thesis.txt").read_text() == "important" and (precious / "sub" / "data.csv").exists()


def test_a_failed_run_leaves_a_bundle_another_process_created_meanwhile(tmp_path: Path) -> None:
    import contextvars

    new = tmp_path / "new"
    with pytest.raises(GeoirError), discard_if_unused(new):
        # Another run creates the bundle first (outside this block's context, as another process would) ...
        contextvars.Context().run(Bundle.open_or_create, new, None)
        # ... this run opens it rather than writing a manifest over it, then fails.
        Bundle.open_or_create(new, None)
        raise GeoirError("this run failed")
    assert (new / "manifest.json").exists()
    # Of two creators, exactly one writes the manifest.
    late = Bundle(new, {**json.loads((new / "manifest.json").read_text()), "created": "later"})
    assert late._create_manifest() is False
    assert json.loads((new / "manifest.json").read_text())["created"] != "later"
    assert sorted(p.name for p in new.iterdir()) == ["manifest.json"]


def test_a_failed_run_leaves_its_new_bundle_to_a_run_that_opened_it_and_writes_it(tmp_path: Path) -> None:
    # Two runs start on one new --index: this one creates the bundle, the other opens it and takes its lock
    # (a second lock on the file stands in for the other process: flock conflicts across open files), then
    # this one fails before its first tile. Removing the bundle then deleted the other run's work.
    for existed in (False, True):
        new = tmp_path / f"new{int(existed)}"
        if existed:
            new.mkdir()
        with contextlib.ExitStack() as other_run:
            with pytest.raises(BundleError, match="being written by another"), discard_if_unused(new):
                Bundle.open_or_create(new, None)
                other_run.enter_context(Bundle.open(new).lock())
                with Bundle.open(new).lock():
                    pass
            assert (new / "manifest.json").exists()
        # Once nobody writes it, a failed run that created a bundle removes it (or empties the folder) ...
        shutil.rmtree(new)
        if existed:
            new.mkdir()
        with pytest.raises(GeoirError), discard_if_unused(new):
            Bundle.open_or_create(new, None)
            opened_meanwhile = Bundle.open(new)
            raise GeoirError("this run failed")
        assert not new.exists() or list(new.iterdir()) == []
        # ... and a run that had opened it then says so, rather than writing into a removed bundle.
        with (
            pytest.raises(BundleError, match=r"removed by another geoir process .* run this command again"),
            opened_meanwhile.lock(),
        ):
            pass
        # A lock file left by that is no obstacle to a new bundle there.
        assert not new.exists() or [p.name for p in new.iterdir()] in ([], [".lock"])
        Bundle.check_new_location(new)


def test_a_bundle_that_cannot_be_written_is_named_by_writers(
    make_geotiff: MakeGeoTiff, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    index = tmp_path / "idx"
    scene = make_geotiff()
    assert geoir("tile", str(scene), "--index", str(index), *BACKBONE).exit_code == 0
    # A catalog opened read-only (a bundle shared by another user, as root cannot be refused by chmod here).
    monkeypatch.setattr(Bundle, "_connect", lambda self: sqlite3.connect(f"file:{self.catalog_path}?mode=ro", uri=True))
    r = geoir("remove", scene.name, "--index", str(index))
    assert_clean_error(r, 1, "cannot write", "catalog.gpkg", "needs write access to the bundle")
    assert (index / "float.faiss").exists()  # a remove that changed nothing keeps the index
    r = geoir("tile", str(make_geotiff("b.tif", seed=3)), "--index", str(index), *BACKBONE)
    assert_clean_error(r, 1, "needs write access to the bundle")
    # A full disk at the catalog's write is one line too, saying nothing was changed (it was a traceback).
    monkeypatch.setattr(Bundle, "_connect", lambda self: _FullDisk(sqlite3.connect(self.catalog_path)), raising=True)
    r = geoir("remove", scene.name, "--index", str(index))
    assert_clean_error(r, 1, "catalog.gpkg (the disk is full); nothing of this change was written")
    assert len(Bundle.open(index).scene_records()) == 1 and (index / "float.faiss").exists()


class _FullDisk:
    """An SQLite connection whose changes fail as on a full disk."""

    def __init__(self, con: object) -> None:
        self.con = con

    def __getattr__(self, name: str) -> object:
        return getattr(self.con, name)

    def __enter__(self) -> object:
        return self.con.__enter__()  # type: ignore[attr-defined]

    def __exit__(self, *exc: object) -> object:
        return self.con.__exit__(*exc)  # type: ignore[attr-defined]

    def execute(self, sql: str, *args: object) -> object:
        import sqlite3

        if sql.lstrip().upper().startswith("DELETE"):
            raise sqlite3.OperationalError("database or disk is full")
        return self.con.execute(sql, *args)  # type: ignore[attr-defined]


def test_a_damaged_vector_file_is_named(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    index = tmp_path / "idx"
    assert geoir("tile", str(make_geotiff()), "--index", str(index), *BACKBONE).exit_code == 0
    (npz,) = (index / "vectors").glob("*.npz")
    npz.write_bytes(npz.read_bytes()[:200])
    (index / "float.faiss").unlink()  # rebuilt from the vector files, which are read
    r = geoir("search", "--point", "0,0", "--index", str(index), "--out", str(tmp_path / "h.gpkg"), *BACKBONE)
    assert r.exit_code == 1 and "Traceback" not in r.output
    tid = int(Bundle.open(index).tiles().tile_id[0])
    r = geoir("search", f"tile:{tid}", "--index", str(index), "--out", str(tmp_path / "h.gpkg"), *BACKBONE)
    assert_clean_error(r, 1, f"{npz} is corrupt", "geoir encode --index")


@pytest.mark.parametrize("value", ["300", "-1", "nan", "2.5"])
def test_a_nodata_value_the_pixels_cannot_hold_is_refused_up_front(
    make_geotiff: MakeGeoTiff, tmp_path: Path, value: str
) -> None:
    index = tmp_path / "idx"
    r = geoir("tile", str(make_geotiff()), "--index", str(index), "--nodata", value, *BACKBONE)
    assert_clean_error(r, 1, f"--nodata {float(value):g} is not a uint8 value", "from 0 to 255")
    assert not index.exists()


def test_output_names_near_and_over_the_length_limit(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    scene = make_geotiff()
    near = tmp_path / ("v" * 240 + ".npy")  # a valid name: its temp name must still fit
    r = geoir("encode", str(scene), "--out", str(near), *BACKBONE)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".npy") == [near.name]
    r = geoir("encode", str(scene), "--out", str(tmp_path / ("v" * 300 + ".npy")), *BACKBONE)
    assert_clean_error(r, 1, "File name too long", "pick another name")


def test_a_refused_run_makes_no_chips_folder_and_chips_may_go_inside_a_new_bundle(
    make_geotiff: MakeGeoTiff, tmp_path: Path
) -> None:
    scene, chips = make_geotiff(), tmp_path / "chips"
    r = geoir("tile", str(scene), "--index", str(tmp_path / "a"), "--export-chips", str(chips),
              "--index-kind", "IVF99999,Flat", *BACKBONE)  # fmt: skip
    assert r.exit_code == 2 and not chips.exists() and not (tmp_path / "a").exists()
    index = tmp_path / "b"
    r = geoir("tile", str(scene), "--index", str(index), "--export-chips", str(index / "chips"), *BACKBONE)
    assert r.exit_code == 0, r.output
    assert len(list((index / "chips").glob("*.tif"))) == 4


def test_a_truncated_png_query_is_refused(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    png = tmp_path / "q.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(png)
    cut = tmp_path / "cut.png"
    cut.write_bytes(png.read_bytes()[:3000])  # GDAL would read the missing rows as zeros, silently
    out = tmp_path / "v.npy"
    assert geoir("encode", str(png), "--out", str(out), *BACKBONE).exit_code == 0
    r = geoir("encode", str(cut), "--out", str(tmp_path / "w.npy"), *BACKBONE)
    assert_clean_error(r, 1, "cut.png cannot be read as an image", "truncated or damaged")


def test_a_png_bomb_is_named_as_too_large_not_as_damaged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PIL's decompression-bomb refusal read "truncated or damaged ... copy or export it again"."""
    import numpy as np
    from PIL import Image

    png = tmp_path / "big.png"
    Image.fromarray(np.zeros((120, 100, 3), dtype=np.uint8)).save(png)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # PIL refuses over twice this: 12,000 pixels is a bomb
    r = geoir("encode", str(png), "--out", str(tmp_path / "v.npy"), *BACKBONE)
    assert_clean_error(r, 1, "big.png declares 12,000 pixels, too many for an image query", "crop or shrink it")
    assert "damaged" not in r.output


def test_encode_refuses_a_scene_whose_file_changed_since_it_was_tiled(
    make_geotiff: MakeGeoTiff, tmp_path: Path
) -> None:
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    a = src / "a.tif"
    shutil.copy(make_geotiff("x.tif", seed=1), a)
    index = tmp_path / "idx"
    assert geoir("tile", str(a), "--index", str(index), "--no-encode").exit_code == 0
    shutil.copy(make_geotiff("y.tif", seed=2), a)  # other pixels under the same name
    r = geoir("encode", "--index", str(index), *BACKBONE)
    assert_clean_error(r, 1, f"{a} changed since it was tiled", f"geoir tile {a} --index {index}")
    assert Bundle.open(index).encoded_scene_ids() == []
    # The way out the message gives: the changed file replaces its old tiles, and is encoded.
    assert geoir("tile", str(a), "--index", str(index), *BACKBONE).exit_code == 0
    bundle = Bundle.open(index)
    assert len(bundle.scene_ids()) == 1 and len(bundle.encoded_scene_ids()) == 1


def test_grids_too_large_are_refused_before_any_work(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    scene, index = make_geotiff(), tmp_path / "idx"
    r = geoir("tile", str(scene), "--index", str(index), "--gsd", "0.001", *BACKBONE)
    assert_clean_error(r, 1, "would be", "at most 5,000,000 per scene", "--gsd")
    r = geoir("tile", str(scene), "--index", str(index), "--size", "100000", *BACKBONE)
    assert_clean_error(r, 1, "tile size must be 1 to 8192 pixels, got 100000")
    assert not index.exists()


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: {"format": m["format"], "format_version": 1},
        lambda m: {**m, "tiling": {**m["tiling"], "size": "big"}},
        lambda m: {**m, "counts": {"scenes": 1}},
    ],
)
def test_a_manifest_missing_what_readers_need_is_named(make_geotiff: MakeGeoTiff, tmp_path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    index = tmp_path / "idx"
    assert geoir("tile", str(make_geotiff()), "--index", str(index), "--no-encode").exit_code == 0
    mf = index / "manifest.json"
    mf.write_text(json.dumps(edit(json.loads(mf.read_text()))))
    for args in (["info", str(index)], ["search", "--point", "0,0", "--index", str(index), "--out", "h.gpkg"]):
        assert_clean_error(geoir(*args), 1, f"{mf} is corrupt", "restore it")


def test_two_bands_are_refused_when_asked_for_and_named_when_a_raster_has_two(
    make_geotiff: MakeGeoTiff, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    two = make_geotiff("two.tif", shape=(2, 256, 256))
    with geoir_warnings(caplog):
        scene = open_scene(two)
    assert scene.bands == (1, 2, 2) and "has 2 colour bands; they are read as 1,2,2" in caplog.text
    r = geoir("tile", str(make_geotiff()), "--index", str(tmp_path / "i"), "--bands", "1,2", "--no-encode")
    assert_clean_error(r, 1, "--bands 1,2: give 3 bands", "--bands 1,2,2")


def test_a_full_disk_is_one_message_naming_the_file(
    make_geotiff: MakeGeoTiff, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC used to end in a traceback wherever a writer let the OSError through (the vectors of a scene,
    a new bundle's manifest, `geoir encode --out`): now one line naming the file, and nothing left behind."""
    import errno

    import numpy as np

    from geoir.io import files

    scene = make_geotiff()
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def no_space(*_a: object, **_k: object) -> None:
        raise full

    index = tmp_path / "idx"
    out = tmp_path / "v.npz"
    with monkeypatch.context() as m:
        m.setattr(np, "savez", no_space)
        r = geoir("tile", str(scene), "--index", str(index), *BACKBONE)
        assert_clean_error(r, 1, "cannot write", str(index / "vectors"), "No space left on device", "free space")
        assert not index.exists()  # the new bundle of a run that committed nothing
        r = geoir("encode", str(scene), "--out", str(out), *BACKBONE)
        assert_clean_error(r, 1, f"{out}: No space left on device; free space there")
    with monkeypatch.context() as m:
        m.setattr(files.os, "fsync", no_space)
        r = geoir("tile", str(scene), "--index", str(index), *BACKBONE)
        assert_clean_error(r, 1, "cannot create the bundle", str(index), "No space left on device")
        assert not index.exists()
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A real file system with 64 KiB left (a small tmpfs, mostly filled): room for a bundle's manifest and
    vectors, not for a catalog or a GeoPackage. Skipped where mounting is not allowed."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN); the full-disk case is tested where it can be")
    try:
        with contextlib.suppress(OSError), open(mnt / "pad", "wb") as f:
            f.write(b"\0" * 192 * 1024)
        yield mnt
    finally:
        subprocess.run(["umount", "--lazy", str(mnt)], check=True)  # lazy: a file GDAL still holds open cannot keep it


def test_a_full_disk_under_gdal_and_sqlite_is_one_short_message(
    make_geotiff: MakeGeoTiff, tmp_path: Path, full_disk: Path
) -> None:
    """GDAL's error quoted the SQL of the whole GeoPackage schema (5,000 characters) before "database or disk
    is full"."""
    index = tmp_path / "idx"
    assert geoir("tile", str(make_geotiff()), "--index", str(index), *BACKBONE).exit_code == 0
    tid = int(Bundle.open(index).tiles().tile_id[0])
    out = full_disk / "h.gpkg"
    r = geoir("search", f"tile:{tid}", "--index", str(index), "--out", str(out), *BACKBONE)
    assert_clean_error(r, 1, f"cannot write {out}", "SQLite: ", "pick another --out")
    assert "CREATE TABLE" not in r.output and len(r.output) < 300, r.output
    assert sorted(p.name for p in full_disk.iterdir()) == ["pad"]
    # The first commit of a new bundle (its catalog) failed with sqlite3's traceback.
    r = geoir("tile", str(make_geotiff()), "--index", str(full_disk / "idx"), *BACKBONE)
    assert_clean_error(r, 1, f"cannot write {full_disk / 'idx' / 'catalog.gpkg'}", "is the disk full? free space")
    assert "CREATE TABLE" not in r.output and len(r.output) < 300, r.output
    assert sorted(p.name for p in full_disk.iterdir()) == ["pad"]


def test_a_catalog_that_cannot_be_opened_now_is_not_called_corrupt(
    make_geotiff: MakeGeoTiff, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Locked by another program, or in WAL mode in a folder geoir cannot write: a healthy catalog, which the
    message used to call corrupt ("restore it or re-create the bundle")."""
    import sqlite3

    from geoir.index import bundle as bundle_mod

    index = tmp_path / "idx"
    assert geoir("tile", str(make_geotiff()), "--index", str(index), *BACKBONE).exit_code == 0
    catalog = index / "catalog.gpkg"
    holder = sqlite3.connect(catalog, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        monkeypatch.setattr(Bundle, "_connect", lambda self: sqlite3.connect(self.catalog_path, timeout=0.1))
        r = geoir("info", "--index", str(index))
        assert_clean_error(r, 1, str(catalog), "is locked by another program", "close it")
        assert "corrupt" not in r.output
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert geoir("info", "--index", str(index)).exit_code == 0
    # WAL mode (QGIS sets it when it edits a GeoPackage), read where the folder cannot be written.
    with sqlite3.connect(catalog) as con:
        con.execute("PRAGMA journal_mode=WAL")
    assert bundle_mod._in_wal_mode(catalog)

    def read_only(self: Bundle) -> sqlite3.Connection:
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(Bundle, "_connect", read_only)
    r = geoir("info", "--index", str(index))
    assert_clean_error(r, 1, "WAL mode", "PRAGMA journal_mode=DELETE")
    with sqlite3.connect(catalog) as con:
        con.execute("PRAGMA journal_mode=DELETE")
    assert not bundle_mod._in_wal_mode(catalog)
    r = geoir("info", "--index", str(index))
    assert_clean_error(r, 1, "holds an unfinished write", "with write access")


def test_a_killed_reader_process_is_one_message(
    make_geotiff: MakeGeoTiff, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The out-of-memory killer taking a DataLoader worker gave torch's traceback."""
    from geoir.encoding import batches

    def killed(*_a: object, **_k: object) -> None:
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")

    monkeypatch.setattr(batches, "iter_batches", killed)
    scene = make_geotiff()
    r = geoir("tile", str(scene), "--index", str(tmp_path / "idx"), "--workers", "1", *BACKBONE)
    assert_clean_error(r, 1, str(scene), "a reader process stopped", "out of memory?", "fewer --workers")


def test_a_bundle_that_cannot_be_written_is_refused_before_the_model_loads(
    make_geotiff: MakeGeoTiff, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An existing bundle without write access used to fail at the first commit, after reading and encoding
    the whole scene (and with "is the disk full?")."""
    from geoir.cli import tile as tile_cli
    from geoir.index import bundle as bundle_mod

    index = tmp_path / "idx"
    assert geoir("tile", str(make_geotiff()), "--index", str(index), *BACKBONE).exit_code == 0
    catalog = index / "catalog.gpkg"
    real_access = os.access
    monkeypatch.setattr(bundle_mod.os, "access", lambda p, mode: Path(p) != catalog and real_access(p, mode))

    def no_model(*_a: object, **_k: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(tile_cli, "resolve_model", no_model)
    r = geoir("tile", str(make_geotiff("b.tif", seed=3)), "--index", str(index), *BACKBONE)
    assert_clean_error(r, 1, f"cannot write {catalog} (permission denied)", "needs write access to the bundle")


def test_a_bundle_left_empty_by_a_killed_first_run_says_it_may_go(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    """A first run killed (SIGKILL, the OOM killer) before its first commit leaves a manifest bound to its tiling
    and model; a later run with other options is refused, and the message says the bundle holds nothing."""
    from geoir.tiling.grid import TilingParams

    index = tmp_path / "idx"
    bundle = Bundle.open_or_create(index, TilingParams(size=128, stride=128))
    bundle.bind_model({"fingerprint": "f" * 64, "name": "other", "backbone_tta": False})
    scene = make_geotiff()
    r = geoir("tile", str(scene), "--index", str(index), *BACKBONE)
    assert_clean_error(r, 1, "was built with model other", "holds no scene", "delete that folder to start anew")
    unbound = tmp_path / "unbound"
    Bundle.open_or_create(unbound, TilingParams(size=128, stride=128))
    r = geoir("tile", str(scene), "--index", str(unbound), "--size", "256", *BACKBONE)
    assert_clean_error(r, 1, "was tiled with --size 128", "holds no scene")
    # Once a scene is committed, the hint is gone: that bundle holds work.
    index2 = tmp_path / "idx2"
    assert geoir("tile", str(scene), "--index", str(index2), *BACKBONE).exit_code == 0
    r = geoir("tile", str(make_geotiff("b.tif", seed=4)), "--index", str(index2), "--size", "128", *BACKBONE)
    assert_clean_error(r, 1, "was tiled with --size 256")
    assert "holds no scene" not in r.output


def test_an_output_that_is_a_folder_is_refused_before_any_work(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    """With --overwrite it used to fail only after the whole search, with "(Is a directory)"."""
    index = tmp_path / "idx"
    assert geoir("tile", str(make_geotiff()), "--index", str(index), *BACKBONE).exit_code == 0
    for name in ("h.geojson", "h.gpkg"):
        folder = tmp_path / name
        folder.mkdir()
        r = geoir("search", "--point", "0.5,0.5", "--index", str(index), "--out", str(folder), "--overwrite", *BACKBONE)
        assert_clean_error(r, 1, f"{folder} is a folder")
        assert folder.is_dir() and not any(folder.iterdir())


def test_an_index_file_of_other_vectors_is_named(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    """Another index copied over the bundle's (binary over float) gave numpy's broadcast error mid-search."""
    import numpy as np

    from geoir.index.vectors import VectorIndex

    index = tmp_path / "idx"
    assert geoir("tile", str(make_geotiff()), "--index", str(index), *BACKBONE).exit_code == 0
    other = VectorIndex(64, kind="binary")
    other.add(np.arange(4), np.zeros((4, 8), np.uint8))
    other.save(index / "float.faiss")
    tid = int(Bundle.open(index).tiles().tile_id[0])
    r = geoir("search", f"tile:{tid}", "--index", str(index), "--out", str(tmp_path / "h.gpkg"), *BACKBONE)
    assert_clean_error(r, 1, "float.faiss holds 64-bit binary vectors", "256-d float ones", "delete that file")
    (index / "float.faiss").unlink()  # the fix the message gives
    r = geoir("search", f"tile:{tid}", "--index", str(index), "--out", str(tmp_path / "h.gpkg"), *BACKBONE)
    assert r.exit_code == 0, r.output


def test_bundle_files_of_the_wrong_kind_are_named(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    """A file named ``vectors`` gave NotADirectoryError in tile, and made a search rebuild empty indexes over
    the good ones; a folder named ``.lock`` was reported as the bundle being unwritable."""
    index = tmp_path / "idx"
    assert geoir("tile", str(make_geotiff()), "--index", str(index), *BACKBONE).exit_code == 0
    tid = int(Bundle.open(index).tiles().tile_id[0])
    faiss_before = (index / "float.faiss").read_bytes()
    (index / "vectors").rename(tmp_path / "vectors")
    (index / "vectors").write_bytes(b"")
    for args in (
        ["tile", str(make_geotiff(name="b.tif")), "--index", str(index), *BACKBONE],
        ["search", f"tile:{tid}", "--index", str(index), "--out", str(tmp_path / "h.gpkg"), *BACKBONE],
    ):
        assert_clean_error(geoir(*args), 1, "vectors is a file", "put the bundle's vectors folder back")
    assert (index / "float.faiss").read_bytes() == faiss_before
    (index / "vectors").unlink()
    (tmp_path / "vectors").rename(index / "vectors")
    (index / ".lock").unlink()
    (index / ".lock").mkdir()
    r = geoir("tile", str(make_geotiff(name="b.tif")), "--index", str(index), *BACKBONE)
    assert_clean_error(r, 1, ".lock is a folder", "remove that folder")
    assert "write access" not in r.output
    (index / ".lock").rmdir()
    assert geoir("tile", str(make_geotiff(name="b.tif")), "--index", str(index), *BACKBONE).exit_code == 0


@pytest.mark.parametrize("record", ["{bad", "{}", "[1, 2]"])
def test_a_damaged_scene_record_is_named(make_geotiff: MakeGeoTiff, tmp_path: Path, record: str) -> None:
    """An edited catalog row gave JSONDecodeError or KeyError tracebacks in info and search."""

    index = tmp_path / "idx"
    assert geoir("tile", str(make_geotiff()), "--index", str(index), *BACKBONE).exit_code == 0
    with editing_catalog(index) as con:
        con.execute("UPDATE scenes SET record = ?", (record,))
    r = geoir("info", "--index", str(index))
    assert_clean_error(r, 1, "catalog.gpkg: the record of scene row 1 is damaged", "restore the file")
    r = geoir("search", "--point", "0.5,0.5", "--index", str(index), "--out", str(tmp_path / "h.gpkg"), *BACKBONE)
    assert_clean_error(r, 1, "the record of scene row 1 is damaged")


def test_a_manifest_model_without_fingerprint_is_named(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    index = tmp_path / "idx"
    assert geoir("tile", str(make_geotiff()), "--index", str(index), *BACKBONE).exit_code == 0
    manifest = json.loads((index / "manifest.json").read_text())
    del manifest["model"]["fingerprint"]
    (index / "manifest.json").write_text(json.dumps(manifest))
    r = geoir("tile", str(make_geotiff("b.tif", seed=5)), "--index", str(index), *BACKBONE)
    assert_clean_error(r, 1, "manifest.json is corrupt (bad or missing model fingerprint)")


def test_chips_that_a_run_exported_into_the_scenes_folder_are_not_scenes_of_the_next_run(
    make_geotiff: MakeGeoTiff, tmp_path: Path
) -> None:
    # A re-run over the folder indexed every chip as a scene of its own: each place twice.
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    scene = make_geotiff("scenes/a.tif")
    index = tmp_path / "idx"
    args = ["tile", str(scenes), "--index", str(index), *BACKBONE]
    assert geoir(*args, "--export-chips", str(scenes / "chips")).exit_code == 0
    assert len(list((scenes / "chips").glob("*.tif"))) == 4 and (scenes / "chips" / ".geoir-chips").is_file()
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert f"{scenes / 'chips'}: left out, chips that geoir tile --export-chips wrote" in r.output
    assert [s["path"] for s in Bundle.open(index).scene_records()] == [str(scene)]
    # Named itself, the chips folder is tiled: the user asks for it.
    r = geoir("tile", str(scenes / "chips"), "--index", str(tmp_path / "chips-idx"), *BACKBONE)
    assert r.exit_code == 0, r.output
    assert len(Bundle.open(tmp_path / "chips-idx").scene_records()) == 4


def test_an_empty_argument_is_refused_not_read_as_the_current_folder(
    make_geotiff: MakeGeoTiff, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import geoir as api

    # `geoir tile "$SCENES"` with the variable unset tiled every raster below the current folder, exit 0.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    scene = make_geotiff("here/a.tif")
    for args, what in (
        (["tile", ""], "SCENE..."),
        (["tile", str(scene), "--index", ""], "--index"),
        (["tile", str(scene), "--index="], "--index"),
        (["search", "", "--out", "h.gpkg"], "QUERY..."),
        (["search", "tile:1", "--out", ""], "--out"),
        (["encode", "", "--out", "v.npy"], "[IMAGE...]"),
        (["info", ""], "[BUNDLE|MODEL]"),
        (["remove", ""], "SCENE..."),
        (["train", "", "--out", "m.pt"], "DATASET"),
    ):
        r = geoir(*args)
        assert_clean_error(r, 2, f"{what} is given an empty value (an unset shell variable?)")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["here"], args
    model = api.load_model("backbone", backbone="test")
    for scenes in ("", [str(scene), ""]):
        with pytest.raises(GeoirError, match="scenes holds an empty path"):
            api.tile(scenes, model=model)
    with pytest.raises(SceneError, match="an empty path names no scene"):
        expand_inputs([""])
    with pytest.raises(GeoirError, match="index is an empty path"):
        api.tile(str(scene), index="", model=model)
    with pytest.raises(GeoirError, match="query holds an empty path"):
        api.search("", model=model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_a_missing_input_file_is_bad_data_for_every_command(tmp_path: Path) -> None:
    # README: a missing file exits 1, one line naming it. DATASET, --aoi and --examples gave click's usage error (2).
    missing = str(tmp_path / "nosuch.gpkg")
    for args in (
        ["tile", missing],
        ["search", missing, "--out", str(tmp_path / "h.gpkg")],
        ["search", "tile:1", "--aoi", missing, "--out", str(tmp_path / "h.gpkg")],
        ["search", "--examples", missing, "--out", str(tmp_path / "h.gpkg")],
        ["encode", missing, "--out", str(tmp_path / "v.npy")],
        ["train", missing, "--out", str(tmp_path / "m.pt")],
        ["eval", missing, "--json", str(tmp_path / "r.json")],
    ):
        r = geoir(*args)
        assert_clean_error(r, 1, missing)
        assert "Usage:" not in r.output and r.output.count("\n") == 1, r.output
    assert list(tmp_path.iterdir()) == []
    # --index is a folder in train and eval too, as in every other command (a file was read as a bundle there).
    (tmp_path / "a.tif").write_text("")
    for command in (["train", str(tmp_path), "--out", str(tmp_path / "m.pt")], ["eval", str(tmp_path), "--json", "-"]):
        assert_clean_error(geoir(*command, "--index", str(tmp_path / "a.tif")), 2, "'--index'", "a.tif' is a file")


def test_a_reader_that_closes_the_pipe_ends_the_command_with_141_and_no_message() -> None:
    # click exits 1 there, the code for bad data, which failed `set -o pipefail` scripts that read no further.
    for args in (["info", "--json", "default"], ["search", "--help"]):
        p = subprocess.Popen(
            [sys.executable, "-m", "geoir", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert p.stdout is not None
        p.stdout.close()  # long before the command writes (its start-up takes a second)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 128 + signal.SIGPIPE, err
        assert err == "", err


def test_a_writer_killed_outright_frees_its_bundle_at_once_not_when_its_readers_end(
    make_geotiff: MakeGeoTiff, tmp_path: Path
) -> None:
    # Forked reader processes inherited the lock file, and flock belongs to the open file: a SIGKILLed `geoir
    # tile` kept its bundle locked ("being written by another geoir process") until torch's watchdog ended them.
    scene = make_geotiff(shape=(3, 1024, 1024))
    index = tmp_path / "idx"
    Bundle.open_or_create(index, None)
    script = (
        "import sys, time\n"
        "from geoir.encoding.batches import iter_batches\n"
        "from geoir.index.bundle import Bundle\n"
        "from geoir.io.scene import open_scene\n"
        "from geoir.tiling.grid import TilingParams\n"
        "from geoir.tiling.tiler import TileSource\n"
        "with Bundle.open(sys.argv[1]).lock():\n"
        "    batches = iter_batches(TileSource(open_scene(sys.argv[2]), TilingParams()), 1, workers=1)\n"
        "    next(batches)\n"
        "    print('reading', flush=True)\n"
        "    time.sleep(120)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", script, str(index), str(scene)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "reading"
        p.kill()
        p.wait(timeout=30)
        time.sleep(0.5)
        with Bundle.open(index).lock():  # not "being written by another geoir process"
            pass
    finally:
        p.kill()
