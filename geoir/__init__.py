"""geoir: find places that look alike in satellite and aerial imagery."""

from __future__ import annotations

__version__ = "0.1.0"
