"""Splits and evaluation protocols for labelled retrieval data sets (UC Merced and the like).

* :func:`stratified_split`: the seeded per-class 80/20 split (METHODS.md §1.10, §2.9), publishable as index
  or path lists with :meth:`Split.to_json`.
* :func:`evaluate_seen`: "seen classes": queries = test images; database = the training images or
  train ∪ test (query excluded); P1 leave-one-out over the test set on request.
* :func:`unseen_class_split` and :func:`evaluate_unseen`: train on some classes, evaluate all-vs-all
  (leave-one-out) on the held-out classes, over several seeds.

Encoders are plain callables ``features (N x D) -> vectors or codes``; the protocol functions never train,
so any head (or none: the backbone alone) can be compared under the same split.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from geoir.errors import DatasetError
from geoir.training.metrics import evaluate_retrieval

__all__ = [
    "Split",
    "evaluate_seen",
    "evaluate_unseen",
    "min_class_size",
    "split_train_size",
    "stratified_split",
    "summarize",
    "unseen_class_split",
]

Encoder = Callable[[np.ndarray], np.ndarray]
Metric = Literal["euclidean", "hamming"]


@dataclass(frozen=True, slots=True)
class Split:
    """Index lists of one split; ``train`` and ``test`` are sorted and disjoint."""

    train: np.ndarray
    test: np.ndarray
    seed: int
    description: str = ""

    def to_json(self, paths: Sequence[str] | None = None) -> str:
        """The split as JSON: indices, and the matching paths when given (so it can be published)."""
        out: dict[str, Any] = {
            "seed": self.seed,
            "description": self.description,
            "train": self.train.tolist(),
            "test": self.test.tolist(),
        }
        if paths is not None:
            out["train_paths"] = [paths[i] for i in self.train]
            out["test_paths"] = [paths[i] for i in self.test]
        return json.dumps(out, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Split:
        """Inverse of :meth:`to_json` (paths are ignored)."""
        d = json.loads(text)
        return cls(
            np.asarray(d["train"], dtype=np.int64),
            np.asarray(d["test"], dtype=np.int64),
            int(d["seed"]),
            d.get("description", ""),
        )


def stratified_split(labels: np.ndarray, train_fraction: float = 0.8, seed: int = 0) -> Split:
    """Seeded per-class split: ``round(train_fraction * n_c)`` images of each class go to train.

    Each class is permuted with ``np.random.default_rng(seed)`` in sorted class order, so the split depends
    only on the labels and the seed.

    Raises:
        DatasetError: If a class has fewer than 2 images or the fraction is not in (0, 1).
    """
    if not 0 < train_fraction < 1:
        raise DatasetError(f"train_fraction must be in (0, 1), got {train_fraction}")
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.nonzero(y == c)[0])
        if len(idx) < 2:
            raise DatasetError(f"class {_plain(c)!r} has {len(idx)} image; every class needs at least 2 to be split")
        n_train = split_train_size(len(idx), train_fraction)
        train.append(idx[:n_train])
        test.append(idx[n_train:])
    return Split(
        np.sort(np.concatenate(train)),
        np.sort(np.concatenate(test)),
        seed,
        f"stratified {train_fraction:.0%} train per class, seed {seed}",
    )


def split_train_size(n: int, train_fraction: float) -> int:
    """Images of a class of ``n`` (>= 2) that :func:`stratified_split` puts in train: ``round(train_fraction *
    n)``, but at least 1 and at most ``n - 1``."""
    return min(max(round(train_fraction * n), 1), n - 1)


def min_class_size(train_fraction: float, min_train: int = 2) -> int:
    """The fewest images a class needs for :func:`stratified_split` to put ``min_train`` of them in train (and
    at least one in test)."""
    if not 0 < train_fraction < 1:
        raise DatasetError(f"train_fraction must be in (0, 1), got {train_fraction}")
    n = max(2, min_train + 1)
    while split_train_size(n, train_fraction) < min_train:
        n += 1
    return n


def evaluate_seen(
    encode: Encoder,
    features: np.ndarray,
    labels: np.ndarray,
    split: Split,
    metric: Metric = "euclidean",
    database: Literal["train", "all", "test"] = "train",
    database_codes: np.ndarray | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Seen-classes protocol: test images query a database of the same classes.

    Args:
        encode: Features -> embeddings (``metric="euclidean"``) or codes (``"hamming"``).
        features: N x D features of the whole data set.
        labels: N labels.
        split: The train/test split.
        metric: Distance for ranking.
        database: ``"train"`` (test vs train), ``"all"`` (test vs train ∪ test, each query excluded from its
            own ranking: METHODS.md P2) or ``"test"`` (leave-one-out within test: P1).
        database_codes: Use these vectors for the training part of the database instead of encoding it
            (DGSSH protocol T: the learned codes V of the training images, rows in ``split.train`` order).
        **kwargs: Passed to :func:`geoir.training.metrics.evaluate_retrieval` (``ks``, ``map_ks``, ...).

    Returns:
        The metric dict of :func:`~geoir.training.metrics.evaluate_retrieval`, plus ``protocol``.
    """
    x, y = np.asarray(features), np.asarray(labels)
    q = encode(x[split.test])
    db_train = encode(x[split.train]) if database_codes is None else np.asarray(database_codes)
    if len(db_train) != len(split.train):
        raise DatasetError(
            f"database_codes has {len(db_train)} rows but the split has {len(split.train)} training images"
        )
    if database == "train":
        out = evaluate_retrieval(q, db_train, y[split.test], y[split.train], metric=metric, **kwargs)
    elif database == "all":
        db = np.concatenate([db_train, q.astype(db_train.dtype)])
        db_labels = np.concatenate([y[split.train], y[split.test]])
        self_index = len(split.train) + np.arange(len(split.test))
        out = evaluate_retrieval(q, db, y[split.test], db_labels, metric=metric, self_index=self_index, **kwargs)
    elif database == "test":
        out = evaluate_retrieval(
            q, q, y[split.test], y[split.test], metric=metric, self_index=np.arange(len(split.test)), **kwargs
        )
    else:
        raise ValueError(f"database must be 'train', 'all' or 'test', got {database!r}")
    out["protocol"] = f"seen classes, queries = test, database = {database}"
    return out


def unseen_class_split(labels: np.ndarray, n_train_classes: int = 15, seed: int = 0) -> Split:
    """Pick ``n_train_classes`` classes at random for training; every image of the others is for evaluation.

    The classes (sorted) are shuffled by ``numpy.random.default_rng(seed).permutation``; the first
    ``n_train_classes`` train, the rest are unseen. This is the draw behind the figures geoir's targets
    quote (backbone float mAP 0.868 on UC Merced, seeds 0-2).

    Raises:
        DatasetError: If fewer than ``n_train_classes + 2`` classes exist.
    """
    y = np.asarray(labels)
    classes = np.unique(y)
    if len(classes) < n_train_classes + 2:
        raise DatasetError(
            f"{len(classes)} classes cannot give {n_train_classes} training classes and at least "
            "2 unseen ones; lower n_train_classes"
        )
    seen = np.random.default_rng(seed).permutation(classes)[:n_train_classes]
    is_seen = np.isin(y, seen)
    return Split(
        np.nonzero(is_seen)[0],
        np.nonzero(~is_seen)[0],
        seed,
        f"unseen classes: train on {n_train_classes} of {len(classes)} classes, seed {seed}",
    )


def evaluate_unseen(
    fit: Callable[[np.ndarray, np.ndarray, int], Encoder],
    features: np.ndarray,
    labels: np.ndarray,
    metric: Metric = "euclidean",
    n_train_classes: int = 15,
    seeds: Sequence[int] = (0, 1, 2),
    **kwargs: Any,
) -> dict[str, Any]:
    """Unseen-classes protocol: train on ``n_train_classes`` classes, then all-vs-all (leave-one-out) on the
    images of the other classes, once per seed.

    Args:
        fit: ``fit(train_features, train_labels, seed) -> encode``; return ``lambda f: f`` for the backbone.
        features: N x D features.
        labels: N labels.
        metric: Distance for ranking.
        n_train_classes: Classes used for training (15 of 21 for UC Merced).
        seeds: One split (and one training run) per seed.
        **kwargs: Passed to :func:`~geoir.training.metrics.evaluate_retrieval`.

    Returns:
        ``{"runs": [metric dict per seed, with "seed" and "unseen_classes"], **summarize(runs)}``.
    """
    x, y = np.asarray(features), np.asarray(labels)
    runs = []
    for seed in seeds:
        split = unseen_class_split(y, n_train_classes, seed)
        encode = fit(x[split.train], y[split.train], seed)
        v = encode(x[split.test])
        out = evaluate_retrieval(
            v, v, y[split.test], y[split.test], metric=metric, self_index=np.arange(len(split.test)), **kwargs
        )
        out["seed"] = seed
        out["unseen_classes"] = [_plain(c) for c in np.unique(y[split.test])]
        runs.append(out)
    return {"runs": runs, **summarize(runs)}


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean and standard deviation over runs of every scalar metric (keys ``NAME_mean``, ``NAME_std``)."""
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    out: dict[str, float] = {}
    for k in keys:
        vals = np.array([r[k] for r in runs], dtype=np.float64)
        out[f"{k}_mean"] = float(vals.mean())
        out[f"{k}_std"] = float(vals.std())
    return out


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v
