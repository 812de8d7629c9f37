"""cProfile of the GPU encode pipeline (one-off profiling aid for encode_throughput.py)."""

import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tile_throughput import make_scene

from geoir.encoding.batches import iter_batches
from geoir.encoding.model import load_model
from geoir.io.scene import open_scene
from geoir.tiling.grid import TilingParams
from geoir.tiling.tiler import TileSource

m = load_model("backbone", device="cuda")
with tempfile.TemporaryDirectory() as tmp:
    src = TileSource(open_scene(make_scene(Path(tmp) / "s.tif", 8192)), TilingParams())

    def run():
        t = time.perf_counter()
        last = t
        for i, b in enumerate(iter_batches(src, 256, 8, pin_memory=True)):
            t0 = time.perf_counter()
            m.encode(torch.from_numpy(b.rgb))
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            print(f"batch {i}: wait {t0 - last:.3f}s encode {t1 - t0:.3f}s", flush=True)
            last = t1
        print("total", time.perf_counter() - t, flush=True)

    cProfile.run("run()", "/tmp/p.out")
    pstats.Stats("/tmp/p.out").sort_stats("tottime").print_stats(12)
