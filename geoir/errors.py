"""Errors raised by geoir.

Every error a user can cause derives from :class:`GeoirError`. Messages name the input and say what
to do next; the CLI prints them on one line and exits with status 1 (status 2 is for bad usage, which
click reports itself).
"""

from __future__ import annotations


class GeoirError(Exception):
    """Root of every error geoir raises for bad input or a bad state on disk."""


class SceneError(GeoirError):
    """A raster cannot be used as a scene (missing, unreadable, no CRS, bad band)."""


class TilingError(GeoirError):
    """Tiling parameters are invalid (size, stride, overlap, GSD)."""


class BundleError(GeoirError):
    """An index bundle is missing, corrupt, locked, or cannot be written."""


class ModelError(GeoirError):
    """A model or its weights cannot be loaded, or do not match a bundle."""


class QueryError(GeoirError):
    """A search query cannot be turned into a vector (bad image, unknown tile id, point outside)."""


class DatasetError(GeoirError):
    """A training or evaluation data set is missing or malformed."""


def user_message(exc: BaseException) -> str:
    """The one-line message of a geoir error, also when a DataLoader worker raised it.

    torch re-raises an exception of a reader process as the same type, with the whole worker traceback
    as its message ("Caught SceneError in DataLoader worker process 0. Original Traceback ...", or the
    chained exceptions it came from); the user needs only the original message, its last line.
    """
    text = str(exc)
    if "in DataLoader worker process" in text or "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        name = type(exc).__name__
        for prefix in (f"{type(exc).__module__}.{name}: ", f"{name}: "):
            if last.startswith(prefix):
                return last[len(prefix) :]
        return last
    return text


def unreadable_file_reason(exc: BaseException) -> str:
    """A short reason why ``torch.load`` (or safetensors) could not read a file, without torch's advice
    to load it unsafely or to file a torch issue."""
    import pickle

    text = str(exc)
    if "PytorchStreamReader" in text or "zip archive" in text:
        return "truncated or damaged: not a whole PyTorch file"
    if (
        isinstance(exc, pickle.UnpicklingError | KeyError | EOFError)
        or "Weights only load failed" in text
        or "invalid load key" in text
        or "magic number" in text
    ):
        return "damaged, or not a PyTorch file"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    # torch's messages go on with advice after their first sentence; the first says what went wrong.
    return first.split(". ")[0].rstrip(".")[:200]
