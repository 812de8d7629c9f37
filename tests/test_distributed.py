"""Tiling on a real Dask LocalCluster (process workers): equal to the single-process run, and robust to
a worker killed mid-run."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import ColorInterp

pytest.importorskip("distributed", reason="dask.distributed not installed (pip install 'geoir[dist]')")

from distributed import Client, LocalCluster

from geoir.distributed import (
    ModelSpec,
    gpu_worker_threads,
    local_cluster,
    spec_for,
    this_worker_device,
    tile_scenes_distributed,
    worker_device,
)
from geoir.encoding.model import load_model
from geoir.errors import SceneError
from geoir.index.bundle import Bundle
from geoir.io.scene import open_scene
from geoir.tiling.grid import TilingParams
from geoir.tiling.run import tile_scenes
from tests.conftest import MakeGeoTiff, truncated


@pytest.fixture(scope="module")
def client():  # type: ignore[no-untyped-def]
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    with Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture
def scenes(make_geotiff: MakeGeoTiff):  # type: ignore[no-untyped-def]
    return [
        open_scene(make_geotiff("a.tif", seed=1, shape=(3, 1024, 1024))),
        open_scene(make_geotiff("b.tif", seed=2, dtype="uint16", nodata=0, nodata_block=True, shape=(3, 768, 768))),
    ]


def run_single(scenes, path: Path, model):  # type: ignore[no-untyped-def]
    bundle = Bundle.open_or_create(path, TilingParams(size=128, stride=128))
    with bundle.lock():
        tile_scenes(bundle, scenes, model=model)
    return Bundle.open(path)


def test_distributed_equals_single_process(client, scenes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = load_model("backbone", backbone="test")
    single = run_single(scenes, tmp_path / "single", model)
    dist = Bundle.open_or_create(tmp_path / "dist", TilingParams(size=128, stride=128))
    with dist.lock():
        tile_scenes_distributed(dist, scenes, client, model=model, spec=spec_for(model), block_tiles=16)
    dist = Bundle.open(tmp_path / "dist")
    a, b = single.tiles().sort_values("tile_id"), dist.tiles().sort_values("tile_id")
    assert a.tile_id.tolist() == b.tile_id.tolist() and len(a) > 60
    assert all(ga.equals_exact(gb, 1e-12) for ga, gb in zip(a.geometry, b.geometry, strict=True))
    va, vb = single.vectors(), dist.vectors()
    oa, ob = np.argsort(va["ids"]), np.argsort(vb["ids"])
    assert np.abs(va["embedding"][oa] - vb["embedding"][ob]).max() < 1e-5
    qa = single.indexes()["float"].search(va["embedding"][:5], 10)
    qb = dist.indexes()["float"].search(va["embedding"][:5], 10)
    assert np.array_equal(qa[1], qb[1])


def test_the_cluster_path_sees_to_catalogued_scenes(client, scenes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """As a single-process run does: a scene catalogued by a --no-encode run is encoded, a moved file followed."""
    model = load_model("backbone", backbone="test")
    single = run_single(scenes, tmp_path / "single", model)
    path = tmp_path / "dist"
    bundle = Bundle.open_or_create(path, TilingParams(size=128, stride=128))
    with bundle.lock():
        tile_scenes(bundle, scenes, model=None)  # --no-encode
    moved = Path(scenes[1].path).rename(tmp_path / "moved.tif")
    again = [scenes[0], open_scene(moved)]
    with bundle.lock():
        report = tile_scenes_distributed(bundle, again, client, model=model, spec=spec_for(model), block_tiles=16)
    assert report.encoded_scenes == [s.id for s in scenes] and not report.skipped_scenes
    dist = Bundle.open(path)
    assert set(dist.encoded_scene_ids()) == {s.id for s in scenes}
    assert {r["path"] for r in dist.scene_records()} == {scenes[0].path, str(moved)}
    va, vb = single.vectors(), dist.vectors()
    oa, ob = np.argsort(va["ids"]), np.argsort(vb["ids"])
    assert np.array_equal(va["ids"][oa], vb["ids"][ob])
    assert np.abs(va["embedding"][oa] - vb["embedding"][ob]).max() < 1e-5
    assert len(dist.indexes()["float"].search(va["embedding"][:1], 5)[1][0]) == 5


def test_the_cluster_path_names_black_tiles_too(client, make_geotiff: MakeGeoTiff, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    rgb = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
    collar = make_geotiff("collar.tif", shape=(3, 512, 512), colorinterp=rgb)
    with rasterio.open(collar, "r+") as dst:
        data = dst.read()
        data[:, :256, :] = 0
        dst.write(data)
    bundle = Bundle.open_or_create(tmp_path / "b", TilingParams(size=128, stride=128))
    with bundle.lock(), caplog.at_level(logging.WARNING, logger="geoir"):
        tile_scenes_distributed(bundle, [open_scene(collar)], client, block_tiles=5)
    assert "8 of its 16 tiles are black in every pixel" in caplog.text


def test_worker_killed_mid_run(client, scenes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = load_model("backbone", backbone="test")
    bundle = Bundle.open_or_create(tmp_path / "dist", TilingParams(size=128, stride=128))
    state = {"done": 0, "killed": None}

    class KillOnFirstBlock:
        """A progress bar that SIGKILLs a worker process as soon as the first block is back."""

        def update(self, n: int) -> None:
            state["done"] += n
            if state["killed"] is None:
                pid = sorted(client.run(os.getpid).values())[0]
                os.kill(pid, signal.SIGKILL)
                state["killed"] = pid

        def close(self) -> None:
            pass

    with bundle.lock():
        tile_scenes_distributed(
            bundle,
            scenes,
            client,
            model=model,
            spec=spec_for(model),
            block_tiles=4,
            progress=lambda total, label: KillOnFirstBlock(),
        )
    assert state["killed"] is not None
    bundle = Bundle.open(tmp_path / "dist")
    single = run_single(scenes, tmp_path / "single", model)
    assert sorted(bundle.tiles().tile_id) == sorted(single.tiles().tile_id)
    assert bundle.tiles().tile_id.is_unique
    assert sorted(bundle.indexes()["float"].ids().tolist()) == sorted(single.tiles().tile_id.tolist())
    # The worker died while most blocks were still to do, and the client saw every block come back.
    assert state["done"] == 64 + 36


def test_a_damaged_scene_stops_the_run_or_is_left_out(client, make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = load_model("backbone", backbone="test")
    scenes = [open_scene(truncated(make_geotiff, tmp_path)), open_scene(make_geotiff("good.tif", shape=(3, 512, 512)))]
    bundle = Bundle.open_or_create(tmp_path / "stop", TilingParams(size=128, stride=128))
    with bundle.lock(), pytest.raises(SceneError, match="truncated or damaged"):
        tile_scenes_distributed(bundle, scenes, client, model=model, spec=spec_for(model), block_tiles=4)
    bundle = Bundle.open_or_create(tmp_path / "skip", TilingParams(size=128, stride=128))
    done = []

    class Count:
        def update(self, n: int) -> None:
            done.append(n)

        def close(self) -> None:
            pass

    with bundle.lock():
        report = tile_scenes_distributed(bundle, scenes, client, model=model, spec=spec_for(model), block_tiles=4,
                                         progress=lambda total, label: Count(), skip_unreadable=True)  # fmt: skip
    assert [p for p, _ in report.unreadable] == [scenes[0].path] and "truncated or damaged" in report.unreadable[0][1]
    bundle = Bundle.open(tmp_path / "skip")
    assert [r["path"] for r in bundle.scene_records()] == [scenes[1].path] and len(bundle.tiles()) == 16
    assert sorted(bundle.indexes()["float"].ids().tolist()) == sorted(bundle.tiles().tile_id.tolist())
    assert sum(done) == 32  # the bar reaches its end: the damaged scene's blocks count as done


def test_spec_checks_fingerprint() -> None:
    spec = ModelSpec("backbone", "test", None, "cpu", "0" * 64)
    with pytest.raises(Exception, match="worker loaded model"):
        spec.load()


def test_cli_cluster_option(make_geotiff: MakeGeoTiff, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from geoir.cli import cli

    scene = make_geotiff("c.tif", seed=5, shape=(3, 512, 512))
    index = tmp_path / "idx"
    r = CliRunner().invoke(cli, ["tile", str(scene), "--index", str(index), "--cluster", "remote:2"])
    assert r.exit_code == 2 and "local:N" in r.output and not index.exists()
    r = CliRunner().invoke(
        cli,
        [
            "-q",
            "tile",
            str(scene),
            "--index",
            str(index),
            "--cluster",
            "local:1",
            "--backbone",
            "test",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    assert Bundle.open(index).n_tiles() == 4 and len(Bundle.open(index).indexes()["float"]) == 4
    # -q turns Dask's own warnings down too ("Worker process still alive after 4.0 seconds, killing").
    assert logging.getLogger("distributed").level == logging.ERROR


def test_quiet_silences_the_local_workers_dask_warnings() -> None:
    geoir_log, dist_log = logging.getLogger("geoir"), logging.getLogger("distributed")
    levels = geoir_log.level, dist_log.level
    try:
        geoir_log.setLevel(logging.WARNING)  # as -q sets it
        with local_cluster(1) as cluster, Client(cluster) as c:
            assert set(c.run(_distributed_log_level).values()) == {logging.ERROR}
        geoir_log.setLevel(logging.INFO)
        with local_cluster(1) as cluster, Client(cluster) as c:
            assert set(c.run(_distributed_log_level).values()) == {logging.WARNING}
    finally:
        geoir_log.setLevel(levels[0])
        dist_log.setLevel(levels[1])


def _distributed_log_level() -> int:
    """The least severe message a worker prints: its ``distributed`` logger's stream handlers' level."""
    log = logging.getLogger("distributed")
    handlers = [h.level for h in log.handlers if isinstance(h, logging.StreamHandler)]
    return max([log.getEffectiveLevel(), *handlers])


@pytest.mark.parametrize(
    ("device", "name", "count", "visible", "local", "expected"),
    [
        ("cpu", 3, 2, None, False, "cpu"),
        ("cuda:1", 0, 2, None, False, "cuda:1"),  # an explicit GPU is kept
        ("auto", 1, 0, None, False, "cpu"),  # auto without a GPU
        ("auto", 1, 2, None, False, "cuda:1"),
        ("cuda", 0, 2, None, False, "cuda:0"),  # LocalCluster worker i -> cuda:(i mod GPUs)
        ("cuda", 1, 2, None, False, "cuda:1"),
        ("cuda", 5, 2, None, False, "cuda:1"),  # several workers per GPU take them in turn
        ("CUDA", "3", 4, None, False, "cuda:3"),
        ("cuda", "tcp://10.0.0.5:4000", 2, None, False, "cuda:0"),  # not a LocalCluster name
        ("cuda", None, 2, None, False, "cuda:0"),  # not on a worker
        ("cuda", 1, 1, "2", False, "cuda:0"),  # CUDA_VISIBLE_DEVICES=2 dask worker: its one GPU
        ("cuda", 1, 4, "1,2,3,0", False, "cuda:0"),  # dask-cuda lists the worker's own GPU first
        ("cuda", 1, 2, "2,3", True, "cuda:1"),  # geoir's cluster: the user's GPUs 2,3 in turn
        ("cuda", 2, 0, None, False, "cuda"),  # no GPU visible: loading says so
    ],
)
def test_worker_device(device, name, count, visible, local, expected) -> None:  # type: ignore[no-untyped-def]
    assert worker_device(device, name, count, visible, local) == expected


def test_gpu_worker_threads() -> None:
    assert gpu_worker_threads(2, cores=32) == 8  # capped
    assert gpu_worker_threads(16, cores=32) == 2
    assert gpu_worker_threads(8, cores=4) == 1
    assert gpu_worker_threads(1, cores=2) == 2


def _device_with_gpus(device: str, count: int) -> str:
    """this_worker_device on a worker that pretends to see ``count`` GPUs (CI has none)."""
    import torch

    real = torch.cuda.device_count
    torch.cuda.device_count = lambda: count  # type: ignore[assignment]
    try:
        return this_worker_device(device)
    finally:
        torch.cuda.device_count = real  # type: ignore[assignment]


def test_local_cluster_gives_each_worker_its_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # geoir's own LocalCluster passes the user's CUDA_VISIBLE_DEVICES on and still spreads its workers.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with local_cluster(3) as cluster, Client(cluster) as c:
        # Out of band (client.run) and inside tasks, each worker finds its own name.
        assert sorted(c.run(_device_with_gpus, "cuda", 2).values()) == ["cuda:0", "cuda:0", "cuda:1"]
        workers = sorted(c.scheduler_info()["workers"])
        futs = [c.submit(_device_with_gpus, "cuda", 2, workers=[w], pure=False) for w in workers]
        assert sorted(f.result() for f in futs) == ["cuda:0", "cuda:0", "cuda:1"]
        assert set(c.run(_device_with_gpus, "cpu", 2).values()) == {"cpu"}
        # The workers fill the cores: GDAL decodes in one thread in each.
        assert set(c.run(_read_threads).values()) == {1}


def _read_threads() -> int:
    from geoir.io.scene import read_threads

    return read_threads()
