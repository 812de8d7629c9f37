"""Encoding throughput: the whole tile pipeline against the bare backbone forward, in the same run.

pipeline = worker processes read windows of a tiled GeoTIFF (decode + scale) -> uint8 batch -> model
device -> resize + normalise -> forward (bf16 + channels-last on CUDA) -> vectors back on the CPU.
bare     = the same backbone's forward on pre-made, already normalised tensors of the same batch size
           (no I/O, no preprocessing), timed with device synchronisation.
read     = the readers alone (workers decoding windows, no model), to tell what bounds the pipeline.

    $ python benchmarks/encode_throughput.py [--device cpu|cuda] [--batch-size 64] [--workers 1] [--side 4096]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _report import machine, table, write_section
from tile_throughput import make_scene

from geoir.encoding.batches import iter_batches
from geoir.encoding.model import load_model
from geoir.io.scene import open_scene
from geoir.tiling.grid import TilingParams
from geoir.tiling.tiler import TileSource


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_forward(model, batch_size: int, n_batches: int) -> float:  # type: ignore[no-untyped-def]
    """Images/s of the backbone forward alone on pre-made normalised tensors."""
    bb = model.backbone
    dev = bb.device
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (batch_size, 3, 256, 256), dtype=torch.uint8, generator=g)
    x = bb.prepare(raw.to(dev)).contiguous(memory_format=torch.channels_last)
    amp = dev.type == "cuda"

    def step() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            bb.model(x)

    for _ in range(3):
        step()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        step()
    sync(dev)
    return batch_size * n_batches / (time.perf_counter() - t0)


def encode_only(model, batch_size: int, n_batches: int) -> float:  # type: ignore[no-untyped-def]
    """Tiles/s of model.encode on a pre-read uint8 batch in (pinned) host memory: transfer + resize +
    normalise + forward + vectors back. The model side's ceiling for the pipeline."""
    dev = model.backbone.device
    raw = torch.randint(
        0, 256, (batch_size, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    if dev.type == "cuda":
        raw = raw.pin_memory()
    for _ in range(2):
        model.encode(raw)
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        model.encode(raw)
    sync(dev)
    return batch_size * n_batches / (time.perf_counter() - t0)


def pipeline(model, source: TileSource, batch_size: int, workers: int, encode: bool = True) -> float:  # type: ignore[no-untyped-def]
    """Tiles/s of read + scale + (resize + normalise + forward), skipping the first batch (warm-up)."""
    n, t0 = 0, None
    pin = model.backbone.device.type == "cuda"
    for i, batch in enumerate(iter_batches(source, batch_size, workers, pin_memory=pin)):
        if encode:
            model.encode(torch.from_numpy(batch.rgb))
        if i == 0:
            sync(model.backbone.device)
            t0 = time.perf_counter()
            continue
        n += len(batch.indexes)
    sync(model.backbone.device)
    assert t0 is not None
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--side", type=int, default=3072, help="side of the generated scene in pixels")
    ap.add_argument("--bare-batches", type=int, default=5)
    ap.add_argument("--section", default=None, help="docs section name [default: encode_throughput_DEVICE]")
    ap.add_argument("--tta", action="store_true", help="encode with test-time averaging (geoir tile --tta)")
    args = ap.parse_args()
    model = load_model("backbone", device=args.device, tta=args.tta)
    dev = model.backbone.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    with tempfile.TemporaryDirectory() as tmp:
        scene_path = make_scene(Path(tmp) / "scene.tif", args.side)
        source = TileSource(open_scene(scene_path), TilingParams())
        rows = []
        bare = bare_forward(model, args.batch_size, args.bare_batches)
        enc = encode_only(model, args.batch_size, args.bare_batches)
        # Read twice (cold, then warm page cache) and keep the better, as the pipeline gets a warm cache.
        read = max(pipeline(model, source, args.batch_size, args.workers, encode=False) for _ in range(2))
        pipe = pipeline(model, source, args.batch_size, args.workers)
        bare2 = bare_forward(model, args.batch_size, args.bare_batches)
    bare_best = max(bare, bare2)
    row = {
        "device": name,
        "batch": args.batch_size,
        "workers": args.workers,
        "tiles": len(source),
        "bare forward img/s": bare_best,
        "encode only tiles/s": enc,
        "read only tiles/s": read,
        "pipeline tiles/s": pipe,
        "pipeline / bare": pipe / bare_best,
        "slower side": "readers (decode cores)" if read < enc else "model side (transfer, preprocess, forward)",
    }
    rows.append(row)
    cols = list(row)
    section = args.section or f"encode_throughput_{dev.type}" + ("_tta" if args.tta else "")
    md = "\n".join(
        [
            f"## Encoding throughput on {name}{' with --tta' if args.tta else ''}: pipeline vs bare backbone forward",
            "",
            f"`python benchmarks/encode_throughput.py --device {args.device} --batch-size {args.batch_size} "
            f"--workers {args.workers} --side {args.side}{' --tta' if args.tta else ''}"
            f"{f' --section {args.section}' if args.section else ''}` on {machine()}; "
            f"torch {torch.__version__}.",
            *(
                [
                    "With --tta every tile is encoded as the mean of its 8 flips and quarter turns (8 forward passes",
                    "per tile); bare forward stays one pass per image, so pipeline / bare shows the cost.",
                ]
                if args.tta
                else []
            ),
            "Backbone tf_efficientnet_lite0 (224 px input, tiles of 256 px resized on the device). bare = forward on",
            "pre-made normalised tensors (best of two, before and after the pipeline); encode only = `Model.encode`",
            "on a uint8 batch already in (pinned) host memory: transfer, resize, normalise, forward, vectors back;",
            "read only = the reader processes alone (decode + scale); pipeline = all of it, end to end.",
            "",
            table(rows, cols),
        ]
    )
    write_section(section, md, {"args": vars(args), "machine": machine(), "rows": rows})
    print(table(rows, cols))


if __name__ == "__main__":
    main()
