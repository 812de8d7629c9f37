"""A geoir model: a frozen backbone plus an optional trained head, saved as one file.

The model decides what a bundle stores: backbone features always (so a new head can be applied later
without running the backbone again), a float embedding (the head's, or the L2-normalised backbone
features when there is no head) and, for hash heads, a packed binary code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from geoir.encoding.backbone import (
    DEFAULT_BACKBONE,
    Backbone,
    DeferredBackbone,
    canonical_backbone_name,
    load_backbone,
    resolve_device,
    torch_load,
)
from geoir.errors import ModelError, unreadable_file_reason
from geoir.io.files import atomic_write_bytes

MODEL_FORMAT = "geoir-model"
MODEL_FORMAT_VERSION = 1
#: Most pixels of a batch of image files (:meth:`Model.encode_images`): 64 images of 1024 x 1024 px, 200 MB as
#: uint8 RGB; larger images go through the backbone in smaller batches.
BATCH_PIXELS = 64 * 1024 * 1024
#: Name of the model shipped inside the package (geoir/models/default.pt), used when none is given.
DEFAULT_MODEL = "default"


@dataclass
class Encoded:
    """Vectors for a batch of tiles (numpy, on the CPU)."""

    features: np.ndarray
    embedding: np.ndarray
    codes: np.ndarray | None = None
    #: Continuous hash outputs ``tanh(W x + b)`` before the sign; combined queries average these.
    u: np.ndarray | None = None


@dataclass
class Model:
    """Backbone + head, with what a bundle needs to know about them.

    Attributes:
        backbone: The frozen backbone.
        head: A trained head from :mod:`geoir.training.heads`, or None (backbone features only).
        head_config: The head's ``config()``.
        meta: Free JSON-able facts: training data summary, metrics, recipe.
    """

    backbone: Backbone
    head: torch.nn.Module | None = None
    head_config: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head is not None:
            self.head = self.head.eval().requires_grad_(False).to(self.backbone.device)

    def __repr__(self) -> str:
        # Not the dataclass repr: ``meta`` lists the training images (15,000 characters in a notebook cell).
        code = f", bits={self.bits}" if self.bits else ""
        tta = ", tta=True" if self.backbone.tta else ""
        return (
            f"Model(name={self.meta.get('name', self.kind)!r}, kind={self.kind!r}, backbone={self.backbone.name!r}, "
            f"embedding_dim={self.embedding_dim}{code}{tta}, device={str(self.backbone.device)!r})"
        )

    @property
    def fingerprint(self) -> str:
        """sha256 over the backbone fingerprint, the head's config and weights, and test-time averaging when
        it is on (vectors of the averaged features are another model's: they must not share a bundle)."""
        h = hashlib.sha256(self.backbone.fingerprint.encode())
        if self.backbone.tta:
            h.update(b"tta=dihedral8\0")
        if self.head is not None:
            h.update(json.dumps(self.head_config, sort_keys=True).encode())
            for k, v in self.head.state_dict().items():
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    @property
    def kind(self) -> str:
        return "backbone" if self.head_config is None else str(self.head_config["name"])

    @property
    def embedding_dim(self) -> int:
        if self.head_config is None or self.kind in ("hash", "plain"):
            return self.backbone.num_features
        dim = getattr(self.head, "embedding_dim", None)
        if isinstance(dim, int):
            return dim
        return int(self.head_config.get("out_dim") or self.head_config.get("embed_dim") or self.backbone.num_features)

    @property
    def bits(self) -> int | None:
        return None if self.head_config is None or self.kind == "srl" else int(self.head_config["bits"])

    def describe(self) -> dict[str, Any]:
        """What the bundle manifest records about the model."""
        return {
            "fingerprint": self.fingerprint,
            "backbone": self.backbone.name,
            "backbone_fingerprint": self.backbone.fingerprint,
            "backbone_taps": list(self.backbone.taps),
            "backbone_tta": self.backbone.tta,
            "preprocess": self.backbone.preprocess.to_dict(),
            "head": self.head_config,
            "feature_dim": self.backbone.num_features,
            "embedding_dim": self.embedding_dim,
            "bits": self.bits,
            "name": self.meta.get("name"),
            "path": self.meta.get("path"),
        }

    def to(self, device: str | torch.device) -> Model:
        self.backbone.to(device)
        if self.head is not None:
            self.head.to(self.backbone.device)
        return self

    def encode_features(self, features: torch.Tensor) -> Encoded:
        """Head outputs for backbone features (a tensor on the model's device)."""
        with torch.inference_mode():
            feats = features.float()
            emb: torch.Tensor
            u: torch.Tensor | None = None
            if self.head is None:
                emb = F.normalize(feats, dim=1)
            else:
                out = self.head(feats)
                if isinstance(out, tuple):
                    emb, u = out
                elif self.kind in ("hash", "plain"):
                    u = out
                    # A hash-only model still offers a float vector for re-ranking: the normalised features.
                    emb = F.normalize(feats, dim=1)
                else:
                    emb = out
            codes = None
            if u is not None:
                # sign(0) := +1 (METHODS.md D-10), packed 8 bits per byte, most significant bit first.
                codes = pack_codes(u.float().cpu().numpy())
            return Encoded(
                features=feats.cpu().numpy().astype(np.float32),
                embedding=emb.float().cpu().numpy(),
                codes=codes,
                u=None if u is None else u.float().cpu().numpy(),
            )

    def encode(self, batch_uint8: torch.Tensor) -> Encoded:
        """Encode a uint8 batch ``[N, 3, H, W]``."""
        return self.encode_features(self.backbone.features(batch_uint8))

    def encode_image(self, rgb: np.ndarray) -> Encoded:
        """Encode one uint8 image ``(3, H, W)`` of any size (the backbone resizes it to its input)."""
        return self.encode(torch.from_numpy(np.ascontiguousarray(rgb[None])))

    def encode_images(
        self, images: Iterable[np.ndarray], batch_size: int = 64, on_batch: Callable[[int], object] | None = None
    ) -> Encoded:
        """Encode uint8 images ``(3, H, W)`` of any sizes, one row each, in order: consecutive images of one
        size go through the backbone together, up to ``batch_size`` of them and :data:`BATCH_PIXELS` pixels;
        ``on_batch(n)`` after each batch of ``n``."""
        parts: list[Encoded] = []
        group: list[np.ndarray] = []

        def flush() -> None:
            parts.append(self.encode(torch.from_numpy(np.stack(group))))
            if on_batch is not None:
                on_batch(len(group))
            group.clear()

        for rgb in images:
            if group and (
                rgb.shape != group[0].shape
                or len(group) >= batch_size
                or (len(group) + 1) * rgb.shape[1] * rgb.shape[2] > BATCH_PIXELS
            ):
                flush()
            group.append(rgb)
        if group:
            flush()
        return self.concat(parts)

    def concat(self, parts: list[Encoded]) -> Encoded:
        """Rows of several encodings in order; empty arrays of this model's shapes when there are none."""
        if not parts:
            codes = np.empty((0, self.bits // 8), np.uint8) if self.bits else None
            return Encoded(
                np.empty((0, self.backbone.num_features), np.float32),
                np.empty((0, self.embedding_dim), np.float32),
                codes,
            )
        codes = np.concatenate([p.codes for p in parts]) if parts[0].codes is not None else None  # type: ignore[misc]
        u = np.concatenate([p.u for p in parts]) if parts[0].u is not None else None  # type: ignore[misc]
        return Encoded(
            np.concatenate([p.features for p in parts]), np.concatenate([p.embedding for p in parts]), codes, u
        )

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str]) -> None:
        """Save head, configs and metadata (not the backbone weights, which come from their package).

        Raises:
            ModelError: The head takes other features than the backbone gives (it was trained on others).
        """
        in_dim = (self.head_config or {}).get("in_dim")
        if in_dim is not None and in_dim != self.backbone.num_features:
            raise ModelError(
                f"the head takes {in_dim} features, but {self.backbone.name} gives {self.backbone.num_features}: it "
                "was trained on other features; train it again"
            )
        payload = {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "backbone": {
                "name": self.backbone.name,
                "fingerprint": self.backbone.fingerprint,
                "preprocess": self.backbone.preprocess.to_dict(),
                "taps": list(self.backbone.taps),
            },
            "head_config": self.head_config,
            "head_state": None if self.head is None else {k: v.cpu() for k, v in self.head.state_dict().items()},
            "meta": self.meta,
            "fingerprint": self.fingerprint,
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        atomic_write_bytes(Path(path), buf.getvalue())


def pack_codes(u: np.ndarray) -> np.ndarray:
    """Binary codes of continuous outputs: sign with sign(0) := +1 (METHODS.md D-10), 8 bits a byte."""
    return np.packbits(np.asarray(u) >= 0, axis=1)


def _path(p: str | os.PathLike[str] | None) -> Path | None:
    return None if p is None else Path(p)


def default_model_path() -> Path | None:
    """The model shipped in the package, if this build has one."""
    p = Path(str(resources.files("geoir") / "models" / f"{DEFAULT_MODEL}.pt"))
    return p if p.exists() else None


def load_model(
    model: str | os.PathLike[str] | None = None,
    *,
    backbone: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    download: bool = False,
    device: str | torch.device = "cpu",
    taps: tuple[int, ...] | None = None,
    tta: bool = False,
    backbone_on_demand: bool = False,
) -> Model:
    """Load a model file, the shipped default, or a bare backbone.

    Args:
        model: A model file from ``geoir train``; ``"default"`` or None for the shipped default model
            (or, in a build without one, the default backbone alone); ``"backbone"`` for no head.
        backbone: timm name of the backbone when ``model`` is ``"backbone"`` (default Lite0).
        weights: Local weights file for the backbone.
        download: Allow timm to download pretrained backbone weights.
        device: ``auto``, ``cpu`` or ``cuda``.
        taps: For a bare backbone: its tapped blocks (None: the backbone's default; see
            :func:`geoir.encoding.backbone.load_backbone`). A model file records its own.
        tta: Encode every tile as the mean features of its 8 flips and quarter turns (8 backbone passes
            per tile; see :meth:`geoir.encoding.backbone.Backbone.features`).
        backbone_on_demand: For a model file with a head: create the backbone only when pixels are encoded
            (:class:`geoir.encoding.backbone.DeferredBackbone`), for work on stored features alone.

    Raises:
        ModelError: The file is missing or not a geoir model, or its backbone does not match.
    """
    path: Path | None
    if model is not None and not isinstance(model, str | os.PathLike):
        raise ModelError(f"model must be a model file, 'default' or 'backbone', got {model!r:.60}")
    if not isinstance(tta, bool | np.bool_):
        # A string such as "no" is true in Python: it would switch averaging on (8 passes per tile).
        raise ModelError(f"tta must be True or False, got {tta!r:.60}")
    tta = bool(tta)
    if model is None or str(model) == DEFAULT_MODEL:
        path = default_model_path()
    elif str(model) == "backbone":
        path = None
    else:
        path = Path(model)
        if not path.exists():
            raise ModelError(
                f"model file {path} not found; train one with `geoir train`, or omit --model to use the shipped default"
            )
    if path is None:
        bb = load_backbone(
            backbone or DEFAULT_BACKBONE, weights=_path(weights), download=download, device=device, taps=taps
        )
        bb.tta = tta
        return Model(bb, meta={"name": "backbone"})
    try:
        payload = torch_load(path)
    except Exception as exc:  # a truncated or foreign file
        raise ModelError(
            f"{path} is not a readable geoir model ({unreadable_file_reason(exc)}); pass a file written by "
            "`geoir train`, or train one again"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ModelError(f"{path} is not a geoir model file; pass a file written by `geoir train`")
    damage = _payload_damage(payload)
    if damage:
        raise ModelError(
            f"{path} is a damaged geoir model file ({damage}); train it again with `geoir train`, or get the file "
            "again from where it came"
        )
    spec = payload["backbone"]
    if backbone is not None and canonical_backbone_name(backbone) != spec["name"]:
        raise ModelError(f"{path} was trained on backbone {spec['name']}, not {backbone}; drop --backbone")
    # Model files written before taps existed used the pooled features alone.
    taps = tuple(spec.get("taps", ()))

    def create() -> Backbone:
        created = load_backbone(spec["name"], weights=_path(weights), download=download, device=device, taps=taps)
        if created.fingerprint != spec["fingerprint"]:
            raise ModelError(
                f"{path} was trained on other {spec['name']} weights (fingerprint {spec['fingerprint'][:12]}, "
                f"loaded {created.fingerprint[:12]}); pass the --weights it was trained with"
            )
        in_dim = (payload["head_config"] or {}).get("in_dim")
        if in_dim is not None and in_dim != created.num_features:
            raise ModelError(
                f"{path}: its head takes {in_dim} features, but its backbone {spec['name']} gives "
                f"{created.num_features}; the file is damaged: train it again with `geoir train`"
            )
        return created

    head_config = payload["head_config"]
    if backbone_on_demand and head_config is not None and "in_dim" in head_config and "preprocess" in spec:
        # Duck-typed: it answers for a Backbone, creating one when pixels come.
        bb = cast(Backbone, DeferredBackbone(spec, head_config["in_dim"], resolve_device(device), create))
    else:
        bb = create()
    from geoir.training.heads import head_from_config

    head = None
    if payload["head_config"] is not None:
        try:
            head = head_from_config(payload["head_config"], payload["head_state"])
        except ModelError as exc:
            raise ModelError(
                f"{path}: {exc}; the file is damaged or was written by another geoir version: "
                "train it again with `geoir train`"
            ) from None
    meta = dict(payload.get("meta") or {})
    meta.setdefault("name", path.stem)
    meta["path"] = str(path.resolve())
    bb.tta = tta
    return Model(bb, head, payload["head_config"], meta)


def _payload_damage(payload: dict[str, Any]) -> str | None:
    """What is wrong with the parts of a model file that loading reads, if anything (None: nothing)."""
    spec = payload.get("backbone")
    if not isinstance(spec, dict):
        return "no backbone description"
    if not isinstance(spec.get("name"), str) or not isinstance(spec.get("fingerprint"), str):
        return "the backbone has no name or fingerprint"
    taps = spec.get("taps", ())
    if not isinstance(taps, list | tuple) or not all(isinstance(t, int) and not isinstance(t, bool) for t in taps):
        return "the backbone's taps are not a list of stage numbers"
    pre = spec.get("preprocess", {})
    if not isinstance(pre, dict):
        return "the backbone's preprocessing is not a mapping"
    size = pre.get("input_size", (3, 224, 224))
    if not (isinstance(size, list | tuple) and all(isinstance(n, int) and 0 < n <= 8192 for n in size)):
        return f"an input size of {str(size)[:40]} pixels"  # each image would be resized to it
    config, state = payload.get("head_config"), payload.get("head_state")
    if config is not None and not isinstance(config, dict):
        return "the head's config is not a mapping"
    if config is not None and not isinstance(state, dict):
        return "a head without weights"
    if config is not None and not (isinstance(config.get("in_dim", 0), int) and config.get("in_dim", 0) >= 0):
        return "the head's input size is not a whole number"
    if not isinstance(payload.get("meta") or {}, dict):
        return "its description (meta) is not a mapping"
    return None


def model_for_bundle(
    described: dict[str, Any] | None,
    model: str | os.PathLike[str] | None = None,
    *,
    backbone: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    download: bool = False,
    device: str | torch.device = "cpu",
    tta: bool | None = None,
    backbone_on_demand: bool = False,
) -> Model:
    """The model to use with a bundle: the one asked for, else the one its manifest describes.

    Args:
        described: The bundle manifest's ``model`` entry (None for a new or unencoded bundle).
        model: Explicit choice (file, ``default`` or ``backbone``); wins when given.
        backbone: timm name; implies ``model="backbone"`` when no model is given.
        weights: Local backbone weights.
        download: Allow timm downloads.
        device: Where to run.
        tta: Test-time averaging (see :func:`load_model`); None: as the bundle was encoded (off for a new one).
        backbone_on_demand: See :func:`load_model`.
    """
    if tta is None:
        # Queries and new scenes must be encoded as the bundle's tiles were.
        tta = bool((described or {}).get("backbone_tta", False))
    taps = None
    if model is None and described is not None:
        if described.get("name") == "backbone":
            model, backbone = "backbone", backbone or described.get("backbone")
            # Bundles written before taps existed hold the pooled features alone.
            taps = tuple(described.get("backbone_taps", ()))
        elif described.get("path") and Path(described["path"]).exists():
            model = described["path"]
    if model is None and backbone is not None:
        model = "backbone"
    return load_model(
        model,
        backbone=backbone,
        weights=weights,
        download=download,
        device=device,
        taps=taps,
        tta=tta,
        backbone_on_demand=backbone_on_demand,
    )
