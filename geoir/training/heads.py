"""Trainable heads that sit on a frozen backbone's pooled features.

* :class:`SRLHead`: ``normalize(W x + b)``, a float embedding for Euclidean/cosine search (METHODS.md §1.3).
* :class:`HashHead`: ``u = tanh(W x + b)`` with a classifier on u, binary codes ``sgn(u)`` (§2.3).
* :class:`PlainHead`: the baseline hash head, same layers as :class:`HashHead`, trained with label-smoothed
  cross-entropy and a small quantisation term only (``geoir.training.fit.train_plain``).
* :class:`CombinedHead`: one SRL head and one hash head on the same features, giving both outputs.

Every head is serialisable as ``(config(), state_dict())``: ``config()`` is a small JSON-able dict whose
``"name"`` picks the class in :data:`HEADS`, and :func:`head_from_config` rebuilds the head.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geoir.errors import ModelError

__all__ = [
    "HEADS",
    "CombinedHead",
    "HashHead",
    "PlainHead",
    "SRLHead",
    "fuse_trained",
    "gate_angles",
    "get_head",
    "head_from_config",
    "pca_whitening",
    "retention_mix",
]


def pca_whitening(features: np.ndarray, dim: int, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """PCA-whitening as a linear map ``x -> W x + b`` onto the top ``dim`` components.

    Args:
        features: N x D training features.
        dim: Output dimension (<= min(N - 1, D): centred, N samples span at most N - 1 axes).
        eps: Added to the eigenvalues before the inverse square root.

    Returns:
        ``W`` (dim x D) and ``b`` (dim), float32.
    """
    x = np.asarray(features, dtype=np.float64)
    # Centred, N samples span at most N - 1 axes: an N-th would have (near) zero variance and be blown up by
    # 1 / sqrt(eps) into the largest axis of every new embedding.
    most = min(x.shape[0] - 1, x.shape[1])
    if dim > most:
        raise ModelError(
            f"cannot whiten {x.shape[1]}-d features from {x.shape[0]} samples to {dim} dimensions; use dim <= {most}"
        )
    mean = x.mean(0)
    xc = x - mean
    # SVD of the centred data: right singular vectors are the principal axes, s²/(N-1) their variances.
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    var = s[:dim] ** 2 / max(x.shape[0] - 1, 1)
    w = vt[:dim] / np.sqrt(var + eps)[:, None]
    return w.astype(np.float32), (-w @ mean).astype(np.float32)


def retention_mix(trained: Tensor, retained: Tensor, angle: float | Tensor) -> Tensor:
    """``[cos(angle) * trained, sin(angle) * retained]``: one angle for every row, or one per row (N)."""
    if isinstance(angle, Tensor):
        a = angle[:, None]
        return torch.cat([torch.cos(a) * trained, torch.sin(a) * retained], dim=1)
    return torch.cat([math.cos(angle) * trained, math.sin(angle) * retained], dim=1)


def gate_angles(confidence: Tensor, lo: float, hi: float, tau: float, temperature: float) -> Tensor:
    """Retention angles of a gate (:meth:`SRLHead.set_gate`): ``hi + (lo - hi) * sigmoid((c - tau) / T)``."""
    return hi + (lo - hi) * torch.sigmoid((confidence - tau) / temperature)


class SRLHead(nn.Module):
    """Linear map then L2 normalisation: the SRL float embedding (METHODS.md §1.3, H1).

    With ``out_dim == in_dim`` the map starts as the identity, so the untrained head reproduces the
    backbone's own (normalised) features. With a smaller ``out_dim`` call :meth:`init_pca_whitening`.

    Args:
        in_dim: Backbone feature dimension D.
        out_dim: Embedding dimension d (default D).
    """

    name = "srl"
    retain_mean: Tensor
    retain_proj: Tensor
    gate_centroids: Tensor

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = None,
        retain: float = 0.0,
        retain_dim: int = 0,
        gate: list[float] | None = None,
        gate_classes: int = 0,
    ) -> None:
        super().__init__()
        self.in_dim, self.out_dim = int(in_dim), int(out_dim or in_dim)
        self.linear = nn.Linear(self.in_dim, self.out_dim)
        with torch.no_grad():
            if self.out_dim == self.in_dim:
                self.linear.weight.copy_(torch.eye(self.in_dim))
            else:
                nn.init.orthogonal_(self.linear.weight)
            self.linear.bias.zero_()
        # The retention branch (off while retain == 0): see set_retention; its gate: see set_gate.
        # Their buffers exist only when they are on, so heads saved without them load unchanged.
        self.retain, self.retain_dim = float(retain), int(retain_dim)
        if self.retain > 0:
            self.register_buffer("retain_mean", torch.zeros(self.in_dim))
            self.register_buffer("retain_proj", torch.zeros(self.in_dim, self.retain_dim))
        self.gate: tuple[float, float, float, float] | None = None
        if gate is not None:
            if self.retain <= 0 or len(gate) != 4 or gate_classes < 1:
                raise ModelError(
                    f"a retention gate needs retention on, 4 numbers and classes (got {gate}, {gate_classes})"
                )
            self.gate = (float(gate[0]), float(gate[1]), float(gate[2]), float(gate[3]))
            self.register_buffer("gate_centroids", torch.zeros(int(gate_classes), self.out_dim))

    @property
    def embedding_dim(self) -> int:
        """Dimension of the vectors :meth:`forward` returns (``out_dim``, plus ``retain_dim`` with retention)."""
        return self.out_dim + (self.retain_dim if self.retain > 0 else 0)

    def set_retention(self, features: np.ndarray, angle: float, dim: int = 256) -> SRLHead:
        """Append the backbone's own geometry to the embedding; returns self.

        The embedding becomes ``[cos(angle) * f, sin(angle) * r]`` (still unit-norm), with ``f`` the trained
        SRL embedding and ``r`` the backbone feature, L2-normalised, centred on the training mean, projected
        on its top ``dim`` principal axes and normalised again. The trained part ranks by the labels; the
        retained part keeps what the labels never named (classes nobody labelled, the same place at another
        date), which a head trained on a few classes otherwise forgets. ``angle = 0`` switches it off.

        Args:
            features: N x D backbone features the mean and principal axes are fitted on.
            angle: Weight of the retained part, in radians (0 to pi/2).
            dim: Principal axes kept (at most min(N, D)).
        """
        z = np.asarray(features, dtype=np.float64)
        z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        mean = z.mean(0)
        dim = min(int(dim), *z.shape)
        _, _, vt = np.linalg.svd(z - mean, full_matrices=False)
        if angle <= 0:
            raise ModelError(f"retention angle must be > 0 radians (got {angle}); leave it off instead")
        device = self.linear.weight.device
        self.retain, self.retain_dim = float(angle), dim
        self.register_buffer("retain_mean", torch.from_numpy(mean.astype(np.float32)).to(device))
        self.register_buffer("retain_proj", torch.from_numpy(np.ascontiguousarray(vt[:dim].T, np.float32)).to(device))
        return self

    def init_pca_whitening(self, features: np.ndarray) -> SRLHead:
        """Set the map to PCA-whitening of ``features`` (N x D); returns self."""
        w, b = pca_whitening(features, self.out_dim)
        with torch.no_grad():
            self.linear.weight.copy_(torch.from_numpy(w))
            self.linear.bias.copy_(torch.from_numpy(b))
        return self

    def init_centering(self, features: np.ndarray) -> SRLHead:
        """Set the bias to ``-W mean(features)`` so the map starts by centring the features; returns self.

        Backbone features after ReLU6 and average pooling are all non-negative, so their cosine similarities
        crowd near 1; centring spreads them out (a better start for the distance-based mining of SRL).
        """
        mean = torch.as_tensor(np.asarray(features, dtype=np.float32).mean(0))
        with torch.no_grad():
            self.linear.bias.copy_(-(self.linear.weight @ mean))
        return self

    def forward(self, x: Tensor) -> Tensor:
        """Unit-norm embeddings, N x :attr:`embedding_dim`."""
        f = self.trained(x)
        return self.with_retention(x, f, f)

    def with_retention(self, x: Tensor, f: Tensor, t: Tensor) -> Tensor:
        """``t`` (a trained part: :meth:`trained` ``f`` itself, or a fused one) with the retained part of
        features ``x`` beside it at the fixed angle or the gate's angles for ``f``; ``t`` without retention."""
        if self.retain <= 0:
            return t
        return retention_mix(t, self.retained(x), self.retain if self.gate is None else self.angles(f))

    def trained(self, x: Tensor) -> Tensor:
        """The trained part alone, ``normalize(W x + b)``: N x :attr:`out_dim`."""
        return F.normalize(self.linear(x), dim=1, eps=1e-12)

    def retained(self, x: Tensor) -> Tensor:
        """The retained part alone (see :meth:`set_retention`), before its angle: N x :attr:`retain_dim`."""
        r = (F.normalize(x, dim=1, eps=1e-12) - self.retain_mean) @ self.retain_proj
        return F.normalize(r, dim=1, eps=1e-12)

    def confidence(self, f: Tensor) -> Tensor:
        """Cosine similarity of trained embeddings ``f`` to their nearest class centroid (needs a gate)."""
        return (f @ self.gate_centroids.T).amax(dim=1)

    def angles(self, f: Tensor) -> Tensor:
        """Per-item retention angles from trained embeddings ``f`` (N x out_dim, unit norm): the fixed
        :attr:`retain`, or the gate's."""
        if self.gate is None:
            return torch.full((len(f),), self.retain, dtype=f.dtype, device=f.device)
        return gate_angles(self.confidence(f), *self.gate)

    def set_gate(
        self, features: np.ndarray, labels: np.ndarray, angle_lo: float, angle_hi: float, tau: float, temperature: float
    ) -> SRLHead:
        """Make the retention angle depend on how well the head knows an item; returns self.

        The *confidence* of an item is the cosine similarity of its trained embedding to the nearest class
        centroid (the normalised mean embedding of each class of ``features``). Items the head knows get
        ``angle_lo`` (ranked mostly by what the labels taught), items far from every class get ``angle_hi``
        (ranked mostly by the backbone's own geometry), with a logistic step of width ``temperature`` at
        confidence ``tau`` between them. Needs :meth:`set_retention` first; :attr:`retain` becomes
        ``angle_hi``.

        Args:
            features: N x D backbone features of the training images.
            labels: Their N class labels.
            angle_lo, angle_hi: Retention angles (radians) of confident and unknown items.
            tau: Confidence at the middle of the step.
            temperature: Width of the step (> 0).
        """
        if self.retain <= 0:
            raise ModelError("set_retention before set_gate: the gate weighs the retained part")
        if not (0 <= angle_lo <= angle_hi <= math.pi / 2 and angle_hi > 0 and temperature > 0):
            raise ModelError(
                f"bad retention gate: angles {angle_lo}..{angle_hi} rad (need 0 <= lo <= hi <= pi/2, hi > 0), "
                f"temperature {temperature} (need > 0)"
            )
        with torch.no_grad():
            f = torch.as_tensor(self.embed_trained(features))
        y = np.asarray(labels)
        classes = np.unique(y)
        cent = torch.stack([f[torch.from_numpy(y == c)].mean(0) for c in classes])
        device = self.linear.weight.device
        self.register_buffer("gate_centroids", F.normalize(cent, dim=1).to(device))
        self.gate = (float(angle_lo), float(angle_hi), float(tau), float(temperature))
        self.retain = float(angle_hi)
        return self

    def embed_trained(self, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """The trained part alone (:meth:`trained`) of an N x D feature array; N x out_dim float32."""
        return _batched(self, features, batch_size, self.trained).numpy().astype(np.float32)

    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments, with the registry name."""
        cfg: dict[str, Any] = {"name": self.name, "in_dim": self.in_dim, "out_dim": self.out_dim}
        if self.retain > 0:
            cfg.update(retain=self.retain, retain_dim=self.retain_dim)
        if self.gate is not None:
            cfg.update(gate=list(self.gate), gate_classes=int(self.gate_centroids.shape[0]))
        return cfg

    @torch.no_grad()
    def embed(self, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """Embed an N x D feature array; returns N x d float32 unit vectors."""
        return _batched(self, features, batch_size).numpy().astype(np.float32)


class HashHead(nn.Module):
    """``u = tanh(W x + b)`` with a classifier on u; binary code ``sgn(u)`` with ``sgn(0) = +1`` (§2.3).

    Args:
        in_dim: Backbone feature dimension D.
        bits: Code length K (a multiple of 8 so that codes pack into bytes for FAISS binary indexes).
        num_classes: Number of classes for the classifier ``W_c u + b_c`` used in training (0: none).
    """

    name = "hash"

    def __init__(self, in_dim: int, bits: int = 64, num_classes: int = 0) -> None:
        super().__init__()
        if bits <= 0 or bits % 8:
            raise ModelError(f"bits must be a positive multiple of 8 (got {bits}); try 16, 32, 48 or 64")
        self.in_dim, self.bits, self.num_classes = int(in_dim), int(bits), int(num_classes)
        self.hash = nn.Linear(self.in_dim, self.bits)
        nn.init.trunc_normal_(self.hash.weight, std=0.02)
        nn.init.zeros_(self.hash.bias)
        self.classifier = nn.Linear(self.bits, self.num_classes) if self.num_classes > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        """Continuous codes ``u`` in (-1, 1), N x K."""
        return torch.tanh(self.hash(x))

    def logits(self, u: Tensor) -> Tensor:
        """Class logits from continuous codes (training only)."""
        if self.classifier is None:
            raise ModelError("this hash head has no classifier; build it with num_classes > 0")
        return self.classifier(u)

    @torch.no_grad()
    def codes(self, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """N x K int8 codes in {-1, +1}: ``sgn(u)``, with 0 mapped to +1."""
        u = _batched(self, features, batch_size)
        return torch.where(u >= 0, 1, -1).to(torch.int8).numpy()

    def packed_codes(self, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """N x K/8 uint8 codes, bit = 1 for +1, packed by ``np.packbits`` (the FAISS binary index layout)."""
        return np.packbits(self.codes(features, batch_size) > 0, axis=1)

    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments, with the registry name."""
        return {"name": self.name, "in_dim": self.in_dim, "bits": self.bits, "num_classes": self.num_classes}


class PlainHead(HashHead):
    """Baseline hash head: the layers of :class:`HashHead`, trained by ``train_plain`` (cross-entropy with
    label smoothing and a small quantisation term, no metric-learning loss). Registered separately so a
    saved model says how it was trained."""

    name = "plain"

    def __init__(self, in_dim: int = 1280, bits: int = 64, num_classes: int = 0) -> None:
        super().__init__(in_dim, bits, num_classes)


def fuse_trained(f: Tensor, u: Tensor, weight: float) -> Tensor:
    """The trained part of a fused float embedding: ``normalize([f, weight * normalize(u)])`` for unit-norm
    SRL embeddings ``f`` and continuous codes ``u`` (the two heads' ensemble; ``f`` itself at weight 0)."""
    if weight <= 0:
        return f
    return F.normalize(torch.cat([f, weight * F.normalize(u, dim=1, eps=1e-12)], dim=1), dim=1, eps=1e-12)


class CombinedHead(nn.Module):
    """A float embedding and a binary code from the same features.

    Args:
        in_dim: Backbone feature dimension D.
        embed_dim: SRL embedding dimension (default D).
        bits: Code length K.
        num_classes: Classes of the hash head's classifier.
        retain, retain_dim, gate, gate_classes: The SRL head's retention and gate (:class:`SRLHead`).
        fuse: With ``> 0``, the float embedding's trained part also holds the hash head's normalised
            continuous code at this weight (:func:`fuse_trained`), ``bits`` more numbers; the gate's
            confidence still comes from the SRL part. 0: the SRL embedding alone.
    """

    name = "combined"

    def __init__(
        self,
        in_dim: int,
        embed_dim: int | None = None,
        bits: int = 64,
        num_classes: int = 0,
        retain: float = 0.0,
        retain_dim: int = 0,
        gate: list[float] | None = None,
        gate_classes: int = 0,
        fuse: float = 0.0,
    ) -> None:
        super().__init__()
        if not (math.isfinite(fuse) and fuse >= 0):
            raise ModelError(f"fuse weight must be finite and >= 0 (got {fuse})")
        self.srl = SRLHead(in_dim, embed_dim, retain, retain_dim, gate, gate_classes)
        self.hash = HashHead(in_dim, bits, num_classes)
        self.fuse = float(fuse)

    @property
    def embedding_dim(self) -> int:
        """Dimension of the float embedding."""
        return self.srl.embedding_dim + (self.hash.bits if self.fuse > 0 else 0)

    @classmethod
    def from_heads(cls, srl: SRLHead, hash_head: HashHead, fuse: float = 0.0) -> CombinedHead:
        """Combine two separately trained heads (copies their weights); ``fuse`` as in the class."""
        if srl.in_dim != hash_head.in_dim:
            raise ModelError(
                f"the SRL head takes {srl.in_dim}-d features but the hash head {hash_head.in_dim}-d; "
                "train both on the same backbone"
            )
        srl_cfg = srl.config()
        out = cls(
            srl.in_dim,
            srl.out_dim,
            hash_head.bits,
            hash_head.num_classes,
            srl.retain,
            srl.retain_dim,
            srl_cfg.get("gate"),
            srl_cfg.get("gate_classes", 0),
            fuse,
        )
        out.srl.load_state_dict(srl.state_dict())
        out.hash.load_state_dict(hash_head.state_dict())
        return out

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(embedding, u)``: unit-norm float embedding and continuous code."""
        u = self.hash(x)
        f = self.srl.trained(x)
        return self.srl.with_retention(x, f, fuse_trained(f, u, self.fuse)), u

    def embed(self, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """Float embeddings: :meth:`SRLHead.embed`, or the fused embedding (see ``fuse``)."""
        if self.fuse <= 0:
            return self.srl.embed(features, batch_size)
        return _batched(self, features, batch_size, lambda x: self(x)[0]).numpy().astype(np.float32)

    def codes(self, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """±1 codes, as :meth:`HashHead.codes`."""
        return self.hash.codes(features, batch_size)

    def packed_codes(self, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """Packed codes, as :meth:`HashHead.packed_codes`."""
        return self.hash.packed_codes(features, batch_size)

    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments, with the registry name."""
        return {
            "name": self.name,
            "in_dim": self.srl.in_dim,
            "embed_dim": self.srl.out_dim,
            "bits": self.hash.bits,
            "num_classes": self.hash.num_classes,
            **{k: v for k, v in self.srl.config().items() if k in ("retain", "retain_dim", "gate", "gate_classes")},
            # Only when on, so the configs (and fingerprints) of unfused models stay as they were.
            **({"fuse": self.fuse} if self.fuse > 0 else {}),
        }


HEADS: dict[str, type[nn.Module]] = {
    "srl": SRLHead,
    "hash": HashHead,
    "plain": PlainHead,
    "combined": CombinedHead,
}


def get_head(name: str) -> type[nn.Module]:
    """Head class registered under ``name``.

    Raises:
        ModelError: For an unknown name; the message lists the valid ones.
    """
    try:
        return HEADS[name]
    except KeyError:
        raise ModelError(f"unknown head {name!r}; valid heads: {', '.join(sorted(HEADS))}") from None


def head_from_config(config: dict[str, Any], state_dict: dict[str, Tensor] | None = None) -> nn.Module:
    """Rebuild a head from ``head.config()`` and, if given, load ``head.state_dict()`` into it.

    Raises:
        ModelError: If the name is unknown, the config has wrong keys, or the weights do not fit.
    """
    cfg = dict(config)
    name = cfg.pop("name", None)
    if name is None:
        raise ModelError(f"head config {config!r} has no 'name'; valid heads: {', '.join(sorted(HEADS))}")
    cls = get_head(name)
    try:
        # Sized on the meta device first (no memory): a model file's config must not allocate more than the
        # weights it holds (an 18 kB file asking for a 21 GB layer), and its numbers may be anything.
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in cls(**cfg).state_dict().items()}
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise ModelError(f"bad config for head {name!r}: {str(exc)[:200]}") from None
    if state_dict is not None:
        if not isinstance(state_dict, Mapping) or not all(isinstance(v, Tensor) for v in state_dict.values()):
            raise ModelError(f"the weights of head {name!r} are not a state dict of tensors")
        given = {k: tuple(v.shape) for k, v in state_dict.items()}
        if given != shapes:
            wrong = sorted(set(given) ^ set(shapes)) or [k for k in shapes if shapes[k] != given[k]]
            raise ModelError(
                f"weights do not fit head {name!r} with config {str(config)[:200]}: {wrong[0]!r:.80} differs"
            )
    head = cls(**cfg)
    if state_dict is not None:
        try:
            head.load_state_dict(state_dict)
        except RuntimeError as exc:
            raise ModelError(f"weights do not fit head {name!r} with config {config}: {exc}") from None
    return head.eval()


def _batched(
    module: nn.Module, features: np.ndarray, batch_size: int, fn: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Run ``module`` (or ``fn``, one of its methods) over a numpy feature array in batches, in eval mode,
    without gradients, in float32."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    run = fn or module
    was_training = module.training
    module.eval()
    with torch.no_grad():
        out = torch.cat([run(x[s : s + batch_size]) for s in range(0, max(len(x), 1), batch_size)])
    module.train(was_training)
    return out
