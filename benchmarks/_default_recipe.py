"""The start every probe that re-trains the shipped model's recipe shares (``retention_sweep.py``,
``fusion_probe.py``, ``hash_lr_sweep.py``): the recipe the default model records, and UC Merced's backbone
features (cached) with the views that recipe trains on."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "ucmerced"
sys.path.insert(0, str(ROOT))

from geoir.encoding.backbone import load_backbone  # noqa: E402
from geoir.encoding.model import load_model  # noqa: E402
from geoir.training.data import FeatureSet, image_folder_features  # noqa: E402
from geoir.training.recipes import Recipe  # noqa: E402


def default_recipe_features(methods: tuple[str, ...], **override: Any) -> tuple[Recipe, FeatureSet]:
    """The default model's recipe (with ``override`` applied) and UC Merced's features for it; exits with a
    message when ``../shared/data/ucmerced`` is absent or the recipe's method is not one of ``methods``."""
    if not DATA.exists():
        sys.exit(f"{DATA} not found: this benchmark needs ../shared/data/ucmerced")
    recipe = Recipe.from_dict({**load_model("default").meta["recipe"], **override})
    if recipe.method not in methods:
        sys.exit(f"the default model's recipe is {recipe.method!r}; this benchmark needs {' or '.join(methods)}")
    return recipe, image_folder_features(DATA, load_backbone(), augment=recipe.views_needed)
