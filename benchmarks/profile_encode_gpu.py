"""Where the GPU encode pipeline spends its time (one-off profiling aid for encode_throughput.py)."""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from geoir.encoding.model import load_model


def timeit(label, fn, n=10):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / n
    print(f"{label:40s} {dt * 1e3:8.2f} ms/batch  {256 / dt:10.0f} img/s", flush=True)


m = load_model("backbone", device="cuda")
bb = m.backbone
raw = torch.randint(0, 256, (256, 3, 256, 256), dtype=torch.uint8)
pinned = raw.pin_memory()
gpu = raw.cuda()
timeit("H2D pageable", lambda: raw.cuda())
timeit("H2D pinned", lambda: pinned.cuda(non_blocking=True))
timeit("prepare on gpu", lambda: bb.prepare(gpu))
x = bb.prepare(gpu).contiguous(memory_format=torch.channels_last)
with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
    timeit("forward", lambda: bb.model(x))
timeit("features(gpu uint8)", lambda: bb.features(gpu))
timeit("features(cpu uint8)", lambda: bb.features(raw))
timeit("encode(cpu uint8)", lambda: m.encode(raw))
timeit("encode(pinned uint8)", lambda: m.encode(pinned))
print("threads", torch.get_num_threads())
