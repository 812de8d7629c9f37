"""How much of the backbone's unseen-class ranking survives in K bits, with no labels at all.

The unseen-class target asks a model's binary code to match the backbone's *float* mAP on classes it was
never taught. This measures what K bits can keep of the backbone's own geometry on that protocol (train on
the 15 training classes' images, rank all-vs-all among the 6 others, seeds 0-2), with the standard
unsupervised hash, ITQ (Gong & Lazebnik, 2011: PCA to K axes fitted on the training images, then the
rotation that best aligns them with the hypercube, 50 iterations):

* ``backbone float``: L2-normalised features, Euclidean (the target's reference);
* ``PCA-K float``: the same, projected on the training images' top K principal axes;
* ``ITQ-K``: the signs of the rotated projection, Hamming (ties by database index).
* ``ITQ-K asymmetric``: the database as those codes, each query as its rotated projection in float,
  ranked by their inner product (asymmetric distance: Gordo et al., 2014); what a binary archive searched
  with a float query could keep.

    $ python benchmarks/binary_bound.py --out benchmarks/results/binary_bound.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_eval_ucmerced import DATA, compute_features, l2_normalize, load_labels  # noqa: E402

from geoir.training.metrics import evaluate_retrieval  # noqa: E402
from geoir.training.protocols import unseen_class_split  # noqa: E402


def itq(train: np.ndarray, bits: int, iterations: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ITQ fitted on ``train`` (N x D): returns the mean and the D x bits projection-and-rotation ``W``;
    the code of ``x`` is ``sign((x - mean) @ W)`` with sign(0) = +1."""
    mean = train.mean(0)
    z = train - mean
    axes = np.linalg.svd(z, full_matrices=False)[2][:bits].T
    v = z @ axes
    rotation = np.linalg.qr(np.random.default_rng(seed).standard_normal((bits, bits)))[0]
    for _ in range(iterations):
        b = np.where(v @ rotation >= 0, 1.0, -1.0)
        u, _, wt = np.linalg.svd(b.T @ v)
        rotation = (u @ wt).T
    return mean, axes @ rotation


def _map(v: np.ndarray, y: np.ndarray, metric: str, database: np.ndarray | None = None) -> float:
    """All-vs-all mAP of ``v`` (each item excluded from its own ranking), against ``database`` rows when given."""
    db = v if database is None else database
    out = evaluate_retrieval(v, db, y, y, metric=metric, ks=(), self_index=np.arange(len(v)))  # type: ignore[arg-type]
    return float(out["mAP"])  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "geoir-ucmerced")
    p.add_argument("--bits", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "binary_bound.json")
    args = p.parse_args(argv)
    if not DATA.is_dir():
        sys.exit(f"UC Merced not found at {DATA}; this benchmark needs ../shared/data/ucmerced")
    t0 = time.perf_counter()
    y, paths = load_labels()
    x = l2_normalize(compute_features(paths, args.cache))
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        split = unseen_class_split(y, 15, seed)
        train, test, yt = x[split.train], x[split.test], y[split.test]
        row: dict[str, Any] = {"seed": seed, "backbone float": _map(test, yt, "euclidean")}
        for k in args.bits:
            mean, w = itq(train, k)
            axes = np.linalg.svd(train - mean, full_matrices=False)[2][:k].T
            row[f"PCA-{k} float"] = _map((test - mean) @ axes, yt, "euclidean")
            codes = np.where((test - mean) @ w >= 0, 1, -1).astype(np.int8)
            row[f"ITQ-{k}"] = _map(codes, yt, "hamming")
            # Every code has norm sqrt(K), so ranking by Euclidean distance after normalisation is ranking by
            # the inner product of the float query with the codes.
            row[f"ITQ-{k} asymmetric"] = _map((test - mean) @ w, yt, "euclidean", codes.astype(np.float64))
        runs.append(row)
        print(json.dumps(row), flush=True)
    keys = [k for k in runs[0] if k != "seed"]
    summary = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    result = {"protocol": "unseen classes (15 train / 6 test, all-vs-all)", "runs": runs, "mean": summary}
    result["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("mean:", json.dumps({k: round(v, 3) for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
