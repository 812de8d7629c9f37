"""What `geoir search` ranks by for a hash-only model (`geoir train --method dgssh`), on UC Merced.

A DGSSH head is trained to rank by Hamming distance; its bundle's float vectors are the backbone's own
(normalised) features. This trains DGSSH heads on the seed-s 80/20 split's training images and scores the
test images as queries against the training images, P@10 and mAP@all, four ways:

* ``codes, Hamming`` the head's codes ranked by Hamming distance, ties by database index (what ``geoir eval``
  reports);
* ``search, order=hamming`` geoir's search path today: Hamming candidates (at least 1,000, so every training
  image here), ordered by Hamming distance, the backbone distance breaking ties;
* ``search, order=float`` the search path before it knew hash-only models: the same candidates re-ranked by the
  backbone features alone;
* ``backbone float`` the normalised features, Euclidean.

    $ python benchmarks/hash_search.py --out benchmarks/results/hash_search.json
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

from geoir.index.vectors import ArrayStore, VectorIndex, hybrid_search  # noqa: E402
from geoir.retrieval.engine import MIN_CANDIDATES, RERANK_FACTOR  # noqa: E402
from geoir.training.fit import train_dgssh  # noqa: E402
from geoir.training.metrics import average_precision, evaluate_retrieval  # noqa: E402
from geoir.training.protocols import stratified_split  # noqa: E402


def _scores(ranked: np.ndarray, y_db: np.ndarray, y_q: np.ndarray) -> dict[str, float]:
    """P@10 and mAP@all of full rankings ``ranked`` (queries x database rows)."""
    rel = y_db[ranked] == y_q[:, None]
    return {"P@10": float(rel[:, :10].mean()), "mAP": float(np.nanmean(average_precision(rel)))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "geoir-ucmerced")
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not DATA.is_dir():
        sys.exit(f"UC Merced not found at {DATA}; this benchmark needs ../shared/data/ucmerced")
    t0 = time.perf_counter()
    y, paths = load_labels()
    x = compute_features(paths, args.cache)
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        split = stratified_split(y, 0.8, seed)
        head, _ = train_dgssh(x[split.train], y[split.train], bits=args.bits, epochs=args.epochs, seed=seed)
        yq, ydb = y[split.test], y[split.train]
        ids = np.arange(len(split.train), dtype=np.int64)
        codes = VectorIndex(args.bits, "binary")
        codes.add(ids, head.packed_codes(x[split.train]))
        floats = ArrayStore(ids, l2_normalize(x[split.train]))
        qc, qf = head.packed_codes(x[split.test]), l2_normalize(x[split.test])
        n = len(ids)
        factor = max(RERANK_FACTOR, -(-MIN_CANDIDATES // n))
        row: dict[str, Any] = {"seed": seed}
        hamming = evaluate_retrieval(head.codes(x[split.test]), head.codes(x[split.train]), yq, ydb, metric="hamming")
        row["codes, Hamming"] = {"P@10": hamming["P@10"], "mAP": hamming["mAP"]}
        for order in ("hamming", "float"):
            ranked = hybrid_search(codes, qc, qf, n, floats, factor=factor, order=order)[1]
            row[f"search, order={order}"] = _scores(ranked, ydb, yq)
        backbone = evaluate_retrieval(qf, l2_normalize(x[split.train]), yq, ydb)
        row["backbone float"] = {"P@10": backbone["P@10"], "mAP": backbone["mAP"]}
        runs.append(row)
        print(json.dumps(row), flush=True)
    result = {"bits": args.bits, "epochs": args.epochs, "runs": runs, "seconds": time.perf_counter() - t0}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
