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
