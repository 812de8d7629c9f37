"""geoir: find places that look alike in satellite and aerial imagery."""

from __future__ import annotations

from typing import TYPE_CHECKING

from geoir.errors import GeoirError

__version__ = "0.1.0"

__all__ = ["GeoirError", "Hits", "Model", "__version__", "encode_images", "load_model", "search", "tile"]

if TYPE_CHECKING:  # what type checkers see; at run time the names come from __getattr__ below
    from geoir.api import Hits, Model, encode_images, load_model, search, tile


def __getattr__(name: str) -> object:
    # The API pulls in torch, FAISS and GDAL: import it on first use so `import geoir` (and `geoir --help`) stay fast.
    if name in ("tile", "search", "encode_images", "load_model", "Hits", "Model"):
        from geoir import api

        return getattr(api, name)
    raise AttributeError(f"module 'geoir' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
