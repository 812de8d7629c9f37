"""Run the evaluation protocols for a model's recipe and the backbone baseline (``geoir eval``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from geoir.errors import DatasetError
from geoir.io.files import atomic_target, atomic_write_text
from geoir.training.data import FeatureSet
from geoir.training.progress import Bar, Progress
from geoir.training.protocols import (
    Metric,
    Split,
    evaluate_seen,
    evaluate_unseen,
    min_class_size,
    split_train_size,
    stratified_split,
    summarize,
    unseen_class_split,
)
from geoir.training.recipes import Recipe, code_encoder, float_encoder, history_summary

METRIC_KW: dict[str, Any] = {"ks": (5, 10, 20, 50, 100), "map_ks": (20,)}
#: Share of every class the seen-classes protocols train on.
SEEN_TRAIN_FRACTION = 0.8
#: Classes the unseen-classes protocol trains on (15 of UC Merced's 21); at least 2 more are held out.
UNSEEN_TRAIN_CLASSES = 15
#: Protocols scored on the seen-class 80/20 splits, with one head trained per split for all of them:
#: ``seen`` (test queries against train ∪ test, METHODS.md P2), ``test`` (test queries against the other
#: test images, P1) and ``reference`` (test queries against the training images; codes against the codes
#: the hash head learned for them, DGSSH's protocol T).
SEEN_PROTOCOLS = ("seen", "test", "reference")
PROTOCOLS = (*SEEN_PROTOCOLS, "unseen")
#: The means :func:`summary_table` shows after mAP@all.
METRIC_COLUMNS = ("mAP@20_mean", "P@10_mean", "ANMRR_mean")


def split_files(protocols: Sequence[str], seeds: Sequence[int], unseen_seeds: Sequence[int]) -> list[str]:
    """Names of the split files :func:`run_protocols` writes to its ``splits_dir``."""
    names = []
    if any(p in SEEN_PROTOCOLS for p in protocols):
        names += [f"seen_seed{s}.json" for s in seeds]
    if "unseen" in protocols:
        names += [f"unseen_seed{s}.json" for s in unseen_seeds]
    return names


def check_protocols(
    labels: np.ndarray,
    classes: Sequence[str],
    protocols: Sequence[str],
    source: str = "the data set",
    unit: str = "images",
) -> None:
    """Fail before any work when the data set cannot be scored under every protocol asked for.

    Args:
        labels: N class indexes into ``classes``.
        classes: Class names (folder names), used in the message.
        protocols: Names among :data:`PROTOCOLS`.
        source: What to call the data set in the message (its path).
        unit: What to call its samples ("images", "labelled tiles").

    Raises:
        DatasetError: Too few classes for ``unseen``, a class too small to be split and trained on, or (``test``)
            one whose test part holds a single image.
    """
    counts = np.bincount(np.asarray(labels), minlength=len(classes))
    seen = [p for p in protocols if p in SEEN_PROTOCOLS]
    if seen:
        need = min_class_size(SEEN_TRAIN_FRACTION)
        small = [(c, int(n)) for c, n in zip(classes, counts, strict=True) if n < need]
        if small:
            listed = ", ".join(f"{c!r} ({n})" for c, n in small[:5]) + (" ..." if len(small) > 5 else "")
            raise DatasetError(
                f"{source}: the {'/'.join(seen)} protocol trains on {SEEN_TRAIN_FRACTION:.0%} of every class and "
                f"needs at least {need} {unit} per class; too few in {listed}; add {unit} or remove those classes"
            )
    if "test" in protocols:
        # Each test image queries the other test images of the split: its class needs another one there.
        few = [
            (c, int(n))
            for c, n in zip(classes, counts, strict=True)
            if n - split_train_size(n, SEEN_TRAIN_FRACTION) < 2
        ]
        if few:
            listed = ", ".join(f"{c!r} ({n})" for c, n in few[:5]) + (" ..." if len(few) > 5 else "")
            raise DatasetError(
                f"{source}: the test protocol ranks each class's test {unit} ({1 - SEEN_TRAIN_FRACTION:.0%} of it) "
                f"against each other and needs at least 2 of them; too few in {listed}; add {unit}, or leave "
                "out --protocol test"
            )
    if "unseen" in protocols:
        need_classes = UNSEEN_TRAIN_CLASSES + 2
        if len(classes) < need_classes:
            others = [p for p in SEEN_PROTOCOLS if p in protocols] or ["seen"]
            raise DatasetError(
                f"{source} has {len(classes)} classes; the unseen protocol trains on {UNSEEN_TRAIN_CLASSES} and "
                f"holds out at least 2 more, so it needs at least {need_classes}; leave it out with "
                + " ".join(f"--protocol {p}" for p in others)
            )
        small = [(c, int(n)) for c, n in zip(classes, counts, strict=True) if n < 2]
        if small:
            raise DatasetError(
                f"{source}: the unseen protocol needs at least 2 {unit} per class; too few in "
                + ", ".join(f"{c!r} ({n})" for c, n in small[:5])
                + f"; add {unit} or remove those classes"
            )


Variant = tuple[str, Metric, Callable[[np.ndarray], np.ndarray]]


def _variants(head) -> list[Variant]:  # type: ignore[no-untyped-def]
    """What a head can be scored as: its float embedding and/or its binary codes."""
    out: list[Variant] = []
    if hasattr(head, "embed"):
        out.append(("float", "euclidean", float_encoder(head)))
    if hasattr(head, "codes"):
        bits = head.config()["bits"]
        out.append((f"{bits}-bit", "hamming", code_encoder(head)))
    return out


def run_protocols(
    model,
    data: FeatureSet,
    protocols: Sequence[str],
    seeds: Sequence[int],  # type: ignore[no-untyped-def]
    unseen_seeds: Sequence[int],
    splits_dir: Path | None = None,
    log: Callable[[str], None] = print,
    tta: bool = False,
    expand: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Scores of the backbone alone and of the model's recipe, re-trained on each split.

    Args:
        progress: A factory ``progress(total, label, unit)`` of a bar with ``update(n)`` and ``close()``
            (:func:`geoir.cli.options.tqdm_progress`), ticked once per split the recipe is trained on and
            naming the split in training where the bar can show a note (tqdm's ``set_postfix_str``).
        tta: Score every image, query and database alike, by the mean features of its 8 flips and quarter
            turns (what ``geoir tile --tta`` encodes); ``data`` must carry the 7 other views. Heads still
            train, and choose their epoch and gate, on single views, as ``geoir train`` does.
        expand: Score every ranking, the backbone's too, after average query expansion with this many items
            (``geoir search --expand``; :func:`~geoir.training.metrics.expand_queries`); 0: none.

    Returns:
        ``{"model": ..., "protocols": {name: {variant: summary with per-seed runs}}, "training": {split:
        what each head's training chose on it}}``: the ``training`` entries (``seen_seedN``,
        ``unseen_seedN``) are :func:`~geoir.training.recipes.history_summary` of the head re-trained on
        that split (best epochs, validation mAP, the retention gate, the code weight).
    """
    recipe = Recipe.from_dict(model.meta["recipe"])
    x, y = data.features, data.labels
    check_protocols(y, data.classes, protocols)
    if recipe.views_needed != "none" and data.views is None:
        raise DatasetError(f"the recipe trains with {recipe.augment} views; compute the data set's features with them")
    # Training features are single views; scored features are either those or (tta) the mean of the 8 views.
    xe = x
    if tta:
        if data.views is None or len(data.views) != 7:
            raise DatasetError("test-time averaging needs the 7 other flips and quarter turns of every image")
        xe = ((x + data.views.sum(0, dtype=np.float64)) / 8).astype(x.dtype)
    kw = {**METRIC_KW, "expand": expand}
    # Split files are written once every protocol has run, so a failed or interrupted run leaves none.
    splits: dict[str, str] = {}

    training: dict[str, Any] = {}
    # Protocol T ranks codes against the codes the hash head learned for its training images (V).
    learned: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    seen_protocols = [p for p in SEEN_PROTOCOLS if p in protocols]
    n_splits = (len(seeds) if seen_protocols else 0) + (len(unseen_seeds) if "unseen" in protocols else 0)
    bar = Bar(progress, n_splits, "training per split", "split")

    def train(rows: np.ndarray, seed: int, split_name: str) -> Any:
        keep = "reference" in protocols and split_name.startswith("seen")
        bar.note(split_name)  # the split being trained, e.g. seen_seed2
        head, history = recipe.train(x[rows], y[rows], views=data.views_of(rows), seed=seed, keep_codes=keep)
        if keep and "V" in history.get("dgssh", {}):
            learned[split_name] = (history["dgssh"]["V"], rows[np.asarray(history["dgssh"]["fit_index"])])
        training[split_name] = history_summary(history)
        bar.tick()
        return head

    backbone = float_encoder(None)
    report: dict[str, Any] = {
        "model": model.meta.get("name"),
        "recipe": recipe.to_dict(),
        "data": data.summary(),
        # Per-class figures and unseen class lists give class indices: these are their names, in order.
        "class_names": list(data.classes),
        "ties": "broken by ascending database index",
        "tta": tta,
        "expand": expand,
        "protocols": {},
    }
    if seen_protocols:
        scored: dict[str, dict[str, list[dict[str, Any]]]] = {p: {} for p in seen_protocols}
        for seed in seeds:
            split = stratified_split(y, SEEN_TRAIN_FRACTION, seed)
            splits[f"seen_seed{seed}.json"] = split.to_json(data.items)
            head = train(split.train, seed, f"seen_seed{seed}")
            base: Variant = ("backbone float", "euclidean", backbone)
            runs = [base] + [(f"{recipe.method} {n}", m, e) for n, m, e in _variants(head)]
            for name, metric, enc in runs:
                for protocol, by_variant in scored.items():
                    # The per-class table and the PR curve are the seen protocol's, first seed.
                    curves = protocol == "seen" and seed == seeds[0]
                    r = _score_seen(protocol, enc, metric, xe, y, split, learned.get(f"seen_seed{seed}"), curves, kw)
                    by_variant.setdefault(name, []).append({"seed": seed, **r})
                    log(f"{protocol} seed {seed} {name}: mAP {r['mAP']:.4f}")
        for protocol, by_variant in scored.items():
            report["protocols"][protocol] = {k: {"runs": v, **summarize(v)} for k, v in by_variant.items()}
    if "unseen" in protocols:
        for seed in unseen_seeds:
            split = unseen_class_split(y, UNSEEN_TRAIN_CLASSES, seed)  # the split evaluate_unseen scores
            splits[f"unseen_seed{seed}.json"] = split.to_json(data.items)
        unseen: dict[str, Any] = {}
        unseen["backbone float"] = evaluate_unseen(
            lambda f, lab, s: backbone,
            xe,
            y,
            metric="euclidean",
            n_train_classes=UNSEEN_TRAIN_CLASSES,
            seeds=unseen_seeds,
            **kw,
        )
        heads: dict[int, Any] = {}

        def fit(name: str) -> Callable[[np.ndarray, np.ndarray, int], Callable[[np.ndarray], np.ndarray]]:
            def f(fx: np.ndarray, fy: np.ndarray, seed: int) -> Callable[[np.ndarray], np.ndarray]:
                if seed not in heads:
                    rows = unseen_class_split(y, UNSEEN_TRAIN_CLASSES, seed).train  # what evaluate_unseen trains on
                    assert np.array_equal(xe[rows], fx), "unseen split out of step with evaluate_unseen"
                    heads[seed] = train(rows, seed, f"unseen_seed{seed}")
                return dict((n, e) for n, _, e in _variants(heads[seed]))[name]

            return f

        for name, metric, _ in _variants(model.head):
            unseen[f"{recipe.method} {name}"] = evaluate_unseen(
                fit(name), xe, y, metric=metric, n_train_classes=UNSEEN_TRAIN_CLASSES, seeds=unseen_seeds, **kw
            )
        for k, v in unseen.items():
            log(f"unseen {k}: mAP {v['mAP_mean']:.4f}")
        report["protocols"]["unseen"] = unseen
    bar.close()
    report["training"] = training
    if splits_dir is not None:
        splits_dir.mkdir(parents=True, exist_ok=True)
        for name, text in splits.items():
            atomic_write_text(splits_dir / name, text)
    return json.loads(json.dumps(report, default=_plain))


def summary_table(report: dict[str, Any]) -> str:
    """The report's means as a Markdown table: one row per protocol and variant (mAP@all ± std over the
    seeds, mAP@20, P@10, ANMRR, the number of seeds)."""
    lines = ["| protocol | variant | mAP@all | mAP@20 | P@10 | ANMRR | seeds |", "|---|---|---|---|---|---|---|"]
    for protocol, variants in report["protocols"].items():
        for name, s in variants.items():
            # A metric the database is too small for (P@10 over fewer than 10 items) is not in the report.
            # A spread over one seed is no spread: the mean alone.
            spread = f" ± {s['mAP_std']:.4f}" if len(s["runs"]) > 1 else ""
            cells = [f"{s['mAP_mean']:.4f}{spread}"]
            cells += [f"{s[k]:.4f}" if k in s else "-" for k in METRIC_COLUMNS]
            lines.append(f"| {protocol} | {name} | " + " | ".join(cells) + f" | {len(s['runs'])} |")
    return "\n".join(lines)


def _score_seen(
    protocol: str,
    encode: Callable[[np.ndarray], np.ndarray],
    metric: Metric,
    features: np.ndarray,
    labels: np.ndarray,
    split: Split,
    learned: tuple[np.ndarray, np.ndarray] | None,
    with_curves: bool,
    kw: dict[str, Any],
) -> dict[str, Any]:
    """One variant's scores on one seen-class split under ``protocol`` (one of :data:`SEEN_PROTOCOLS`).

    ``learned`` is ``(V, rows)``: the codes the hash head learned for the training images it fitted, and
    those images' rows; protocol ``reference`` ranks a code variant's test queries against them (DGSSH's
    protocol T) and every other variant's against the network's encoding of the training images."""
    if protocol == "seen":
        return evaluate_seen(
            encode, features, labels, split, metric=metric, database="all", with_curves=with_curves, **kw
        )
    if protocol == "test":
        return evaluate_seen(encode, features, labels, split, metric=metric, database="test", **kw)
    if metric == "hamming" and learned is not None:
        codes, rows = learned
        fitted = Split(rows, split.test, split.seed, split.description)
        out = evaluate_seen(
            encode, features, labels, fitted, metric=metric, database="train", database_codes=codes, **kw
        )
        out["protocol"] = "seen classes, queries = test, database = the codes learned for the training images (T)"
        return out
    return evaluate_seen(encode, features, labels, split, metric=metric, database="train", **kw)


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(type(v))


def write_pr_curve(report: dict[str, Any], out: Path, size: tuple[int, int] = (640, 480)) -> None:
    """Draw the seen-protocol precision-recall curves (first seed) of every variant as a PNG."""
    from PIL import Image, ImageDraw

    curves = []
    for name, summary in report["protocols"].get("seen", {}).items():
        pr = summary["runs"][0].get("pr_curve")
        if pr:
            curves.append((name, pr["recall"], pr["precision"]))
    w, h = size
    m = 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([m, m // 2, w - m // 2, h - m], outline="black")
    for t in np.linspace(0, 1, 6):
        x = m + t * (w - 1.5 * m)
        y = h - m - t * (h - 1.5 * m)
        d.text((x - 8, h - m + 6), f"{t:.1f}", fill="black")
        d.text((8, y - 6), f"{t:.1f}", fill="black")
    d.text((w // 2 - 20, h - 20), "recall", fill="black")
    d.text((4, 8), "precision", fill="black")
    colors = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02"]
    for i, (name, rec, prec) in enumerate(curves):
        pts = [(m + r * (w - 1.5 * m), h - m - p * (h - 1.5 * m)) for r, p in zip(rec, prec, strict=True)]
        d.line(pts, fill=colors[i % len(colors)], width=2)
        d.text((m + 10, m // 2 + 8 + 14 * i), name, fill=colors[i % len(colors)])
    with atomic_target(out, ".png") as tmp:
        img.save(tmp)
