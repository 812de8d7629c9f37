"""Tiling on a real Dask LocalCluster (process workers): equal to the single-process run, and robust to
a worker killed mid-run."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed", reason="dask.distributed not installed (pip install 'geoir[dist]')")

from distributed import Client, LocalCluster

from geoir.distributed import ModelSpec, spec_for, tile_scenes_distributed
from geoir.encoding.model import load_model
from geoir.index.bundle import Bundle
from geoir.io.scene import open_scene
from geoir.tiling.grid import TilingParams
from geoir.tiling.run import tile_scenes
from tests.conftest import MakeGeoTiff


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
