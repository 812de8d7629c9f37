"""Seen- and unseen-class mAP of the default recipe's float embedding over the retention angle.

The default model's SRL embedding keeps the backbone's own features beside the trained ones, weighted by
an angle, or a per-tile gate of angles, that validation chooses (docs/training.md). This scores the
chosen gate and then sweeps fixed angles of the same trained head on the evaluation splits
themselves, to show the trade-off the choice makes; it is a diagnostic, never a way to pick the angle
(that would select on test queries).

For each unseen-class seed the recipe is trained on its 15 classes and the other 6 are ranked all-vs-all;
for each seen-class seed it is trained on the 80 % part and the test queries are ranked against
train + test (as ``geoir eval`` does). The trained head is the same for every angle: only the weight of
the retained part changes.

    $ python benchmarks/retention_sweep.py [--seen-seeds 0] [--unseen-seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _default_recipe import default_recipe_features  # noqa: E402
from _report import RESULTS, machine, table  # noqa: E402

from geoir.training.metrics import evaluate_retrieval  # noqa: E402
from geoir.training.protocols import evaluate_seen, stratified_split, unseen_class_split  # noqa: E402
from geoir.training.recipes import float_encoder  # noqa: E402

ANGLES = (0.0, 0.3, 0.6, 0.75, 0.9, 1.05, 1.2, 1.35, float(np.pi / 2))
#: The row of a gated head as trained (its per-tile angles, docs/training.md).
GATED = "gate chosen by validation"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seen-seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--unseen-seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=RESULTS / "retention_sweep.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    # The float embedding is the SRL part of the default (combined) recipe; its hash part plays no role here.
    recipe, data = default_recipe_features(("srl",), method="srl")
    x, y = data.features, data.labels

    def train(rows: np.ndarray, seed: int):  # type: ignore[no-untyped-def]
        return recipe.train(x[rows], y[rows], views=data.views_of(rows), seed=seed)[0]

    rows: dict[str, dict[str, list[float]]] = {f"{a:.2f}": {"seen": [], "unseen": []} for a in ANGLES}
    rows[GATED] = {"seen": [], "unseen": []}
    backbone: dict[str, list[float]] = {"seen": [], "unseen": []}
    chosen: list[Any] = []

    def sweep(head, score) -> None:  # type: ignore[no-untyped-def]
        srl = head.srl if hasattr(head, "srl") else head
        chosen.append(srl.retain if srl.gate is None else {"gate": list(srl.gate)})
        if not srl.retain:
            raise SystemExit("the recipe trained without retention; nothing to sweep")
        if srl.gate is not None:
            yield GATED, score(srl.embed)  # the head as validation chose it
            srl.gate = None  # then the same trained and retained parts at fixed angles
        for a in ANGLES:
            srl.retain = a  # 0 switches the retained part off
            yield f"{a:.2f}", score(srl.embed)

    for seed in args.unseen_seeds:
        split = unseen_class_split(y, 15, seed)
        head = train(split.train, seed)
        yt = y[split.test]

        def unseen(encode, split=split, yt=yt):  # type: ignore[no-untyped-def]
            v = encode(x[split.test])
            kw = {"metric": "euclidean", "self_index": np.arange(len(yt)), "ks": ()}
            return evaluate_retrieval(v, v, yt, yt, **kw)["mAP"]

        backbone["unseen"].append(unseen(float_encoder(None)))
        for a, m in sweep(head, unseen):
            rows[a]["unseen"].append(m)
        print(f"unseen seed {seed} done", flush=True)
    for seed in args.seen_seeds:
        split = stratified_split(y, 0.8, seed)
        head = train(split.train, seed)

        def seen(encode, split=split):  # type: ignore[no-untyped-def]
            return evaluate_seen(encode, x, y, split, metric="euclidean", database="all", ks=())["mAP"]

        backbone["seen"].append(seen(float_encoder(None)))
        for a, m in sweep(head, seen):
            rows[a]["seen"].append(m)
        print(f"seen seed {seed} done", flush=True)

    def mean(v: list[float]) -> float | str:
        return float(np.mean(v)) if v else ""

    table_rows = [
        {"angle (rad)": "backbone alone", "seen mAP": mean(backbone["seen"]), "unseen mAP": mean(backbone["unseen"])}
    ]
    table_rows += [
        {"angle (rad)": a, "seen mAP": mean(r["seen"]), "unseen mAP": mean(r["unseen"])}
        for a, r in rows.items()
        if r["seen"] or r["unseen"]
    ]
    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": machine(),
        "seconds": time.perf_counter() - t0,
        "angle chosen by validation, per run": chosen,
        "backbone": backbone,
        "angles": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(table_rows, ["angle (rad)", "seen mAP", "unseen mAP"]))
    print(f"validation chose {chosen}; {result['seconds']:.0f} s; written {args.out}")


if __name__ == "__main__":
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    main()
