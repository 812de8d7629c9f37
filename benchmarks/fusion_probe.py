"""A lead for the default model's float embedding: fuse the hash head's continuous code into it.

The default (``combined``) model has two heads on the same backbone features: the SRL embedding ``f``
(with its retained part and per-tile gate, docs/training.md) and the DGSSH hash head, whose continuous
output ``u = tanh(W x + b)`` is signed into the 64-bit code. geoir's float embedding uses ``f`` alone.
This scores, on the evaluation splits, what the float embedding would rank like if its trained part were
``t = normalize([f, w * normalize(u)])`` (the two heads' ensemble) under the same gate, and how the
seen/unseen trade-off moves when the gate's confidence step moves. It is a diagnostic on test
queries, not a way to choose ``w`` or the gate (that would select on test figures): ``geoir train
--fuse-codes`` chooses them on validation, and the shipped model does not use it (docs/results.md).

For each unseen-class seed the recipe trains on its 15 classes and the other 6 are ranked all-vs-all;
for each seen-class seed it trains on the 80 % part and the test queries are ranked against train + test
(as ``geoir eval`` does).

    $ python benchmarks/fusion_probe.py [--seen-seeds 0 1 2 3 4] [--unseen-seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _default_recipe import default_recipe_features  # noqa: E402
from _report import RESULTS, atomic_write, machine, table  # noqa: E402

from geoir.training.fit import GATE_TAUS  # noqa: E402
from geoir.training.heads import CombinedHead, fuse_trained, gate_angles, retention_mix  # noqa: E402
from geoir.training.metrics import evaluate_retrieval  # noqa: E402
from geoir.training.protocols import evaluate_seen, stratified_split, unseen_class_split  # noqa: E402

#: Weights of the hash head's normalised continuous code beside the SRL trained part.
WEIGHTS = (0.5, 1.0)

Encoder = Callable[[np.ndarray], np.ndarray]


def encoders(head: CombinedHead) -> dict[str, Encoder]:
    """Float encoders of one trained default-recipe head, keyed by the row they fill."""
    srl = head.srl
    assert srl.gate is not None, "the default recipe trains a gated SRL embedding"
    lo, hi, tau0, temp = srl.gate

    def parts(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            xt = torch.as_tensor(x, dtype=torch.float32)
            return srl.trained(xt), srl.retained(xt), head.hash(xt)

    def gated(w: float, tau: float) -> Encoder:
        def enc(x: np.ndarray) -> np.ndarray:
            f, r, u = parts(x)
            # The confidence is the shipped gate's: the SRL trained part against its class centroids.
            a = gate_angles(srl.confidence(f), lo, hi, tau, temp)
            return retention_mix(fuse_trained(f, u, w), r, a).numpy()

        return enc

    def alone(w_f: float, w_u: float) -> Encoder:
        def enc(x: np.ndarray) -> np.ndarray:
            f, _, u = parts(x)
            return F.normalize(torch.cat([w_f * f, w_u * F.normalize(u, dim=1)], dim=1), dim=1).numpy()

        return enc

    out: dict[str, Encoder] = {
        "SRL trained part alone": alone(1.0, 0.0),
        "hash head's continuous code alone (normalised)": alone(0.0, 1.0),
        "SRL + code (w 1), trained parts alone": alone(1.0, 1.0),
        "shipped: SRL part, gate as chosen": gated(0.0, tau0),
    }
    out.update({f"SRL + code (w {w}), gate as chosen": gated(w, tau0) for w in WEIGHTS})
    for tau in GATE_TAUS:
        out[f"step at {tau:.2f}: SRL part"] = gated(0.0, tau)
        out[f"step at {tau:.2f}: SRL + code (w 1)"] = gated(1.0, tau)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seen-seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    ap.add_argument("--unseen-seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=RESULTS / "fusion_probe.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    recipe, data = default_recipe_features(("combined",))
    x, y = data.features, data.labels
    rows: dict[str, dict[str, list[float]]] = {}
    gates: list[Any] = []

    def train(rows_: np.ndarray, seed: int) -> CombinedHead:
        head = recipe.train(x[rows_], y[rows_], views=data.views_of(rows_), seed=seed)[0]
        assert isinstance(head, CombinedHead)
        gates.append(list(head.srl.gate or []))
        return head

    for seed in args.unseen_seeds:
        split = unseen_class_split(y, 15, seed)
        head, yt = train(split.train, seed), y[split.test]
        for name, enc in encoders(head).items():
            v = enc(x[split.test])
            kw = {"metric": "euclidean", "self_index": np.arange(len(yt)), "ks": ()}
            rows.setdefault(name, {"seen": [], "unseen": []})["unseen"].append(
                evaluate_retrieval(v, v, yt, yt, **kw)["mAP"]
            )
        print(f"unseen seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    for seed in args.seen_seeds:
        split = stratified_split(y, 0.8, seed)
        head = train(split.train, seed)
        for name, enc in encoders(head).items():
            m = evaluate_seen(enc, x, y, split, metric="euclidean", database="all", ks=())["mAP"]
            rows.setdefault(name, {"seen": [], "unseen": []})["seen"].append(m)
        print(f"seen seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    def mean(v: list[float]) -> float | str:
        return float(np.mean(v)) if v else ""

    table_rows = [
        {"float embedding": k, "seen mAP": mean(r["seen"]), "unseen mAP": mean(r["unseen"])} for k, r in rows.items()
    ]
    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": machine(),
        "seconds": time.perf_counter() - t0,
        "gate chosen by validation, per run (unseen seeds, then seen seeds)": gates,
        "rows": rows,
    }
    atomic_write(args.out, json.dumps(result, indent=1))
    print(table(table_rows, ["float embedding", "seen mAP", "unseen mAP"]))
    print(f"{result['seconds']:.0f} s; written {args.out}")


if __name__ == "__main__":
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    main()
