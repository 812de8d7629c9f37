"""Training recipes: a method name and its settings, turned into a trained head.

A model file records its recipe, so ``geoir eval`` can re-train the same recipe on each split of a
protocol (seen classes over several seeds, unseen classes) and never scores a model on images it saw.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from torch import nn

from geoir.errors import DatasetError
from geoir.training import defaults
from geoir.training.data import AUGMENTS
from geoir.training.defaults import METHODS
from geoir.training.heads import CombinedHead
from geoir.training.progress import Progress


@dataclass
class Recipe:
    """How to train a head.

    Attributes:
        method: ``srl`` (float embedding), ``dgssh`` (hash codes), ``plain`` (baseline hash head) or
            ``combined`` (SRL embedding + DGSSH codes).
        bits: Code length for hash methods.
        dim: SRL embedding dimension (None: the backbone's).
        epochs: Training epochs (None: the method's default).
        seed: Seed of the validation split, sampling and initialisation.
        retain_dim: For ``srl`` and ``combined``: principal axes of the backbone's own features appended to
            the SRL embedding, weighted by an angle chosen on the validation split (0: off; see
            :func:`geoir.training.fit.train_srl`).
        retain_gate: Let validation also choose a per-item retention angle from how close an item lies to
            a class the head was taught (:meth:`geoir.training.heads.SRLHead.set_gate`).
        augment: Which heads also train on the 7 other flips and quarter turns of every image (one view
            drawn per sample and step; the caller passes their features as ``views``): ``dihedral-codes``
            the hash head only, ``dihedral`` every head (the default, the shipped model's recipe), ``none``
            no head. Views make a head treat a turned or mirrored scene as the same scene, which lifts
            class-level retrieval. With one retention angle for all items they cost the float embedding the
            detail that finds the same place again at another date; the retention gate keeps it
            (relocalization: docs/results.md), so without the gate prefer ``dihedral-codes``.
        distill: For ``srl`` and ``combined``: weight of the similarity-distillation term that keeps the
            trained embedding's pairwise similarities near the backbone's own (``distill`` of
            :func:`geoir.training.fit.train_srl`; 0: off). It keeps what the labels never named in the
            trained part itself, not only in the retained axes.
        fuse_codes: For ``combined`` with retention: let validation also choose how much of the hash
            head's continuous code the float embedding holds beside the SRL embedding (0, 0.5 or 1; the
            two heads' ensemble, ``fuse_codes`` of :func:`geoir.training.fit.train_srl`). Off by default:
            the shipped model is trained without it (docs/results.md measures the lead).
        refit: Which heads, once validation has chosen their epoch, train again on every training item,
            the validation items included, for that many epochs of the same schedule, and are kept (``refit``
            of :func:`geoir.training.fit.train_srl`): ``codes`` (the hash head of ``dgssh``, ``plain`` and
            ``combined``; the default), ``float`` (the SRL embedding), ``all`` or ``none``. Validation's other
            choices carry over. Each refit head trains a second time, for its chosen epochs. The default
            re-trains the codes only: re-training the float embedding too lifts its class-level mAP but finds
            the same place at another date less often (docs/results.md). Older records' ``True`` / ``False``
            read as ``all`` / ``none``.
        options: Extra keyword arguments of the training function (see :mod:`geoir.training.fit`).
    """

    method: str = defaults.METHOD
    bits: int = defaults.CODE_BITS
    dim: int | None = None
    epochs: int | None = None
    seed: int = 0
    retain_dim: int = defaults.RETAIN_DIM
    retain_gate: bool = True
    augment: str = "dihedral"
    distill: float = defaults.DISTILL
    fuse_codes: bool = defaults.FUSE_CODES
    refit: str = defaults.REFIT
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DatasetError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.bits not in defaults.BITS:
            raise DatasetError(f"--bits {self.bits}: use one of {', '.join(map(str, defaults.BITS))}")
        if self.retain_dim < 0:
            raise DatasetError(f"--retain-dim {self.retain_dim}: use 0 (off) or a positive number of axes")
        if not (math.isfinite(self.distill) and self.distill >= 0):
            raise DatasetError(f"--distill {self.distill}: use 0 (off) or a positive, finite weight")
        if self.augment not in AUGMENTS:
            raise DatasetError(f"--augment {self.augment}: use one of {', '.join(AUGMENTS)}")
        if self.refit not in defaults.REFITS:
            raise DatasetError(f"--refit {self.refit}: use one of {', '.join(defaults.REFITS)}")
        if self.fuse_codes and (self.method != "combined" or self.retain_dim <= 0):
            raise DatasetError(
                "--fuse-codes weighs the hash head's code into the float embedding: it needs --method combined "
                "and retention (--retain-dim > 0)"
            )

    @property
    def views_needed(self) -> str:
        """The augmentation the training data must carry: :attr:`augment`, or ``none`` when no head of this
        method trains on views (an ``srl`` head under ``dihedral-codes``), so none are computed."""
        if self.augment == "dihedral-codes" and self.method == "srl":
            return "none"
        return self.augment

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def applied(self) -> dict[str, Any]:
        """The settings that shaped this method's heads, as they took effect (what ``geoir info`` shows).

        Settings of a head the method has not are left out (``bits`` of ``srl``; ``dim``, ``retain_dim``,
        ``distill`` of the hash methods; the gate and the code weight without retention), unset ones too, and
        ``augment`` and ``refit`` read as what they did to its heads (``refit=codes`` re-trains no ``srl``
        head: ``none``).
        """
        floats, codes = self.method in ("srl", "combined"), self.method != "srl"
        retains = floats and self.retain_dim > 0
        refit = {
            "srl": "float" if self.refit in ("float", "all") else "none",
            "combined": self.refit,
        }.get(self.method, "codes" if self.refit in ("codes", "all") else "none")
        shown = {
            "method": self.method,
            "bits": self.bits if codes else None,
            "dim": self.dim if floats else None,
            "epochs": self.epochs,
            "seed": self.seed,
            "retain_dim": self.retain_dim if floats else None,
            "retain_gate": self.retain_gate if retains else None,
            "augment": self.augment if self.views_needed != "none" or self.augment == "none" else "none",
            "distill": self.distill if floats else None,
            "fuse_codes": self.fuse_codes if retains and self.method == "combined" else None,
            "refit": refit,
        }
        return {k: v for k, v in shown.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        # Recipes recorded before retention, its gate, augmentation, distillation or refitting existed trained
        # without them.
        old = {"retain_dim": 0, "retain_gate": False, "augment": "none", "distill": 0.0, "fuse_codes": False}
        refit = d.get("refit", "none")
        if isinstance(refit, bool):  # recorded when one switch re-trained every head
            refit = "all" if refit else "none"
        return cls(**{**old, **d, "refit": refit})

    def head_options(self, key: str) -> dict[str, Any]:
        """Keyword arguments for the ``key`` head's trainer (``srl``, ``dgssh`` or ``plain``): its options, and the
        recipe's epochs when set."""
        kw = dict(self.options.get(key, {}))
        if self.epochs is not None:
            kw["epochs"] = self.epochs
        return kw

    def train(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        views: np.ndarray | None = None,
        log: Callable[[str], None] | None = None,
        seed: int | None = None,
        keep_codes: bool = False,
        progress: Progress | None = None,
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Train the head on features and labels; returns ``(head, history)``.

        With ``keep_codes`` a DGSSH head's history keeps ``V``, the codes it learned for the items it fitted
        (rows ``fit_index``), which DGSSH's protocol T ranks against; otherwise they are dropped.
        ``progress`` (:data:`geoir.training.progress.Progress`) gives every training loop a bar over its epochs."""
        from geoir.training.fit import train_dgssh, train_plain, train_srl

        seed = self.seed if seed is None else seed
        float_views = views if self.augment == "dihedral" else None
        code_views = views if self.augment in ("dihedral", "dihedral-codes") else None
        code_kw: dict[str, Any] = {
            "bits": self.bits,
            "views": code_views,
            "refit": self.refit in ("codes", "all"),
            "seed": seed,
            "log": log,
            "progress": progress,
        }
        hist: dict[str, Any] = {}
        head: nn.Module | None
        srl = dg = None
        if self.method in ("srl", "combined"):
            kw = {
                "retain_dim": self.retain_dim,
                "retain_gate": self.retain_gate,
                "distill": self.distill,
                **self.head_options("srl"),
            }
            if self.fuse_codes:
                # The retention probe trains a hash head like the one below (without its views when only
                # the codes take views: the probe's float and code heads see the same data).
                kw["fuse_codes"] = {"bits": self.bits, **self.head_options("dgssh")}
            refit = self.refit in ("float", "all")
            srl, hist["srl"] = train_srl(
                features,
                labels,
                dim=self.dim,
                views=float_views,
                refit=refit,
                seed=seed,
                log=log,
                progress=progress,
                **kw,
            )
        if self.method in ("dgssh", "combined"):
            dg, h = train_dgssh(features, labels, **code_kw, **self.head_options("dgssh"))
            if not keep_codes:
                h.pop("V", None)
            hist["dgssh"] = h
        if self.method == "plain":
            head, hist["plain"] = train_plain(features, labels, **code_kw, **self.head_options("plain"))
            return head, hist
        if self.method == "combined":
            assert srl is not None and dg is not None
            return CombinedHead.from_heads(srl, dg, fuse=float(hist["srl"].get("fuse", 0.0))), hist
        head = srl if srl is not None else dg
        assert head is not None
        return head, hist


def history_summary(history: dict[str, Any]) -> dict[str, Any]:
    """What each head's training chose, JSON-able: per head (``srl``, ``dgssh``, ``plain``) its scalars (best
    epoch, best validation mAP, seconds; for an SRL head with retention the angle and the code weight
    ``fuse``), the retention gate validation chose, if any, and the refit (epochs, items, seconds), if
    any; the per-epoch curves are left out."""
    out: dict[str, Any] = {}
    for part, h in history.items():
        out[part] = {k: v for k, v in h.items() if isinstance(v, int | float | str)}
        if h.get("retain_gate") is not None:
            out[part]["retain_gate"] = [float(v) for v in h["retain_gate"]]
        if h.get("refit") is not None:
            out[part]["refit"] = dict(h["refit"])
    return out


def float_encoder(head: nn.Module | None) -> Callable[[np.ndarray], np.ndarray]:
    """features -> float vectors ranked by Euclidean distance (L2-normalised features without a head)."""
    if head is None or not hasattr(head, "embed"):
        return lambda f: f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return head.embed  # type: ignore[return-value]


def code_encoder(head: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """features -> ±1 codes ranked by Hamming distance."""
    return head.codes  # type: ignore[return-value,operator]
