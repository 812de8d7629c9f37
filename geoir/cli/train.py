"""``geoir train``: train a retrieval head on a frozen backbone."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import click

from geoir.cli.options import (
    backbone_options,
    overwrite_option,
    progress_enabled,
    refuse_existing,
    tqdm_progress,
    verbosity_options,
)
from geoir.io.vectors import VectorPathType
from geoir.training import defaults

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("geoir")

DATASET_KINDS = (
    "a folder of class folders (CLASS/*.jpg) or a vector file (GeoPackage/GeoJSON/Shapefile) of labelled "
    "geometries with --index"
)


def check_dataset_kind(dataset: Path, index_dir: str | None, ctx: click.Context | None = None) -> str | None:
    """A folder of class folders goes without --index; a vector file of labelled geometries needs one.
    Returns the bundle to use: none for a folder when --index came from $GEOIR_INDEX (set for search)."""
    from click.core import ParameterSource

    from_env = ctx is not None and ctx.get_parameter_source("index_dir") is ParameterSource.ENVIRONMENT
    if dataset.is_dir() and from_env:
        return None
    if dataset.is_dir() and index_dir is not None:
        raise click.UsageError(
            f"{dataset} is a folder of class folders, whose images are encoded as they are; --index is for a "
            "vector file of labelled geometries over a bundle's tiles: leave --index out"
        )
    if not dataset.is_dir() and index_dir is None:
        raise click.UsageError(
            f"{dataset} is not a folder, so it is read as a vector file of labelled geometries: pass the --index "
            "bundle whose tiles it labels"
        )
    return index_dir


def _features(
    ctx: click.Context,
    dataset: Path,
    index_dir: str | None,
    backbone_name: str | None,
    weights: str | None,
    download: bool,
    device: str,
    workers: int,
    augment: str,
):  # type: ignore[no-untyped-def]
    """Backbone and labelled features of DATASET (a folder of class folders, or labelled geometries)."""
    from geoir.encoding.backbone import DEFAULT_BACKBONE, load_backbone
    from geoir.training.data import bundle_features, image_folder_features

    if dataset.is_dir():
        bb = load_backbone(backbone_name or DEFAULT_BACKBONE, weights=weights, download=download, device=device)
        progress = tqdm_progress(progress_enabled(ctx))
        return bb, image_folder_features(dataset, bb, workers=workers, progress=progress, augment=augment)
    from geoir.encoding.model import load_model
    from geoir.index.bundle import Bundle

    assert index_dir is not None
    if augment != "none":
        raise click.UsageError(
            f"--augment {augment} needs the pixels of every sample, and a bundle stores only its tiles' "
            "features; pass --augment none to train on labelled tiles"
        )
    bundle = Bundle.open(index_dir)
    if bundle.model is None:
        raise click.ClickException(f"{index_dir} is not encoded; run `geoir encode --index {index_dir}` first")
    if backbone_name is not None and backbone_name != bundle.model["backbone"]:
        # Labelled tiles are the bundle's stored features: of its backbone, whatever --backbone says.
        raise click.BadParameter(
            f"{backbone_name} is not the backbone {index_dir} was encoded with ({bundle.model['backbone']}); "
            "labelled tiles train on that bundle's features: drop --backbone, or tile into a bundle of that backbone",
            param_hint="'--backbone'",
        )
    bb = load_model(
        "backbone", backbone=bundle.model["backbone"], weights=weights, download=download, device=device
    ).backbone
    if bb.fingerprint != bundle.model["backbone_fingerprint"]:
        raise click.ClickException(f"{index_dir} was encoded with other {bb.name} weights; pass its --weights")
    return bb, bundle_features(dataset, bundle)


def resolve_augment(augment: str, dataset: Path, retain_dim: int, retain_gate: bool) -> str:
    """What ``--augment auto`` means for DATASET: every head on the dihedral views for an image folder (the
    shipped model's recipe), but the float embedding on the images as given when no retention gate guards
    it (with one retention angle for all tiles, views cost it the detail that finds the same place at
    another date: docs/results.md); no views for a bundle's labelled tiles, whose pixels it does not keep.
    Any other value is returned as given."""
    if augment != "auto":
        return augment
    if not dataset.is_dir():
        return "none"
    return "dihedral" if retain_dim > 0 and retain_gate else "dihedral-codes"


@click.command(short_help="Train a head (SRL, DGSSH) on labelled images or tiles.")
@click.argument("dataset", type=VectorPathType())
@click.option(
    "--method",
    type=click.Choice(list(defaults.METHODS)),
    default=defaults.METHOD,
    show_default=True,
    help="srl: float embedding; dgssh: hash codes; combined: both; plain: baseline.",
)
@click.option(
    "--bits",
    type=click.Choice([str(b) for b in defaults.BITS]),
    default=str(defaults.CODE_BITS),
    show_default=True,
    help="Code length of hash methods.",
)
@click.option("--dim", type=click.IntRange(min=8), default=None, help="SRL embedding size [default: backbone's].")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs [default: the method's].")
@click.option(
    "--retain-dim",
    type=click.IntRange(min=0),
    default=defaults.RETAIN_DIM,
    show_default=True,
    help="srl/combined: backbone principal axes kept beside the trained embedding (0: off); "
    "their weight is chosen on the validation split.",
)
@click.option(
    "--retain-gate/--no-retain-gate",
    default=True,
    show_default=True,
    help="srl/combined: let validation also choose a per-tile weight of the kept axes, small for tiles "
    "near a class the head was taught, large for tiles unlike any of them.",
)
@click.option(
    "--distill",
    type=click.FloatRange(min=0.0),
    default=defaults.DISTILL,
    show_default=True,
    help="srl/combined: weight of the term that keeps the trained embedding's pairwise similarities near "
    "the backbone's own, so it forgets less of what the labels never named (0: off).",
)
@click.option(
    "--fuse-codes/--no-fuse-codes",
    default=defaults.FUSE_CODES,
    show_default=True,
    help="combined: let validation also weigh the hash head's continuous code into the float embedding "
    "(0, 0.5 or 1; bits more numbers per tile).",
)
@click.option(
    "--refit",
    type=click.Choice(defaults.REFITS),
    default=defaults.REFIT,
    show_default=True,
    help="Which heads, once validation has chosen their epoch, train again on every training image (the "
    "validation tenth included) for that many epochs and are kept: the hash head (codes), the float "
    "embedding (float), both (all) or none.",
)
@click.option(
    "--augment",
    type=click.Choice(["auto", "dihedral", "dihedral-codes", "none"]),
    default="auto",
    show_default=True,
    help="Also train on the 7 flips/quarter turns of every image (8 backbone passes, cached; image folders "
    "only): for every head (dihedral), the hash head only (dihedral-codes), or none. auto: dihedral for an "
    "image folder (dihedral-codes with the retention gate off), none for labelled tiles of a bundle.",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0, max=2**32 - 1),
    default=0,
    show_default=True,
    help="Seed of the splits and the training.",
)
@click.option(
    "--test-fraction",
    type=click.FloatRange(0.0, 0.9),
    default=0.2,
    show_default=True,
    help="Held out per class and recorded in the model (`geoir info` lists them; `geoir eval` makes its own "
    "splits); 0 trains on everything, as the model to use should.",
)
@click.option(
    "--index",
    "index_dir",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    envvar="GEOIR_INDEX",
    help="Bundle whose tiles a vector DATASET labels (env: GEOIR_INDEX).",
)
@click.option(
    "--out", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Model file to write (.pt)."
)
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="Image reader processes.")
@overwrite_option
@backbone_options
@click.pass_context
@verbosity_options
def train(
    ctx: click.Context,
    dataset: Path,
    method: str,
    bits: str,
    dim: int | None,
    epochs: int | None,
    retain_dim: int,
    retain_gate: bool,
    distill: float,
    fuse_codes: bool,
    refit: str,
    augment: str,
    seed: int,
    test_fraction: float,
    index_dir: str | None,
    out: Path,
    workers: int,
    overwrite: bool,
    backbone: str | None,
    weights: str | None,
    download: bool,
    device: str,
) -> None:
    """Train a retrieval head on DATASET's backbone features and write a model file.

    DATASET is a folder of class folders (CLASS/*.jpg, like UC Merced) or a vector file of labelled
    points/polygons (a `label` column) over the tiles of --index (FILE:LAYER for one layer of several).
    Backbone features are computed once and cached. The protocol's test split (--test-fraction per
    class, --seed) is held out and recorded; model selection uses a validation split of the rest, never
    the test images.

    \b
    Examples:
      $ geoir train ucmerced/ --method combined --bits 64 --out ucm.pt
      $ geoir train labels.gpkg --index geoir-index --method srl --augment none --out mine.pt
      $ geoir tile scene.tif --model ucm.pt --index ucm-index
    """
    import numpy as np

    from geoir.encoding.model import Model
    from geoir.training.protocols import stratified_split
    from geoir.training.recipes import Recipe, history_summary

    if out.suffix.lower() != ".pt":
        raise click.BadParameter(f"{out}: a model file is written as .pt; use e.g. {out.stem}.pt", param_hint="'--out'")
    if not dataset.is_dir() and dataset.suffix.lower() in _image_file_suffixes():
        raise click.BadParameter(
            f"{dataset} is an image or raster file, not a data set; pass {DATASET_KINDS}", param_hint="'DATASET'"
        )
    index_dir = check_dataset_kind(dataset, index_dir, ctx)
    refuse_existing(out, overwrite)
    if Path(out).is_file():
        # Bundles record their model's fingerprint: those encoded with the model this file holds cannot be
        # searched or extended with the new one.
        log.warning(
            "%s will be replaced: bundles encoded with the model it holds now need that model; keep a copy "
            "of it if you will search them, or tile their scenes again with the new one",
            out,
        )
    augment = resolve_augment(augment, dataset, retain_dim, retain_gate)
    recipe = Recipe(
        method=method,
        bits=int(bits),
        dim=dim,
        epochs=epochs,
        seed=seed,
        retain_dim=retain_dim,
        retain_gate=retain_gate,
        augment=augment,
        distill=distill,
        fuse_codes=fuse_codes,
        refit=refit,
    )
    if dataset.is_dir():
        from geoir.training.data import list_image_folder

        _, labels, classes = list_image_folder(dataset)
        _check_class_sizes(labels, classes, dataset, test_fraction)  # before the backbone reads any image
    bb, data = _features(ctx, dataset, index_dir, backbone, weights, download, device, workers, recipe.views_needed)
    if not dataset.is_dir():
        # A bundle's labelled tiles are known only now; a folder's classes were checked above.
        _check_class_sizes(data.labels, data.classes, dataset, test_fraction)
    if test_fraction > 0:
        split = stratified_split(data.labels, 1 - test_fraction, seed)
        train_idx, test_idx = split.train, split.test
    else:
        train_idx, test_idx = np.arange(len(data.labels)), np.array([], dtype=np.int64)
    log.info(
        "training %s on %d samples of %d classes (%d held out for eval)",
        method,
        len(train_idx),
        len(data.classes),
        len(test_idx),
    )
    head, history = recipe.train(
        data.features[train_idx],
        data.labels[train_idx],
        views=data.views_of(train_idx),
        log=lambda s: log.debug("%s", s),
        progress=tqdm_progress(progress_enabled(ctx)),
    )
    _warn_without_validation(history, test_fraction, "image" if dataset.is_dir() else "labelled tile")
    meta = {
        "name": out.stem,
        "recipe": recipe.to_dict(),
        "data": {
            "dataset": dataset.resolve().name,
            **data.summary(),
            "classes_list": data.classes,
            # Features of a --tta bundle are the mean over each tile's 8 flips and quarter turns.
            **({"features_tta": True} if data.tta else {}),
        },
        "split": {"seed": seed, "test_fraction": test_fraction, "test_items": [data.items[i] for i in test_idx]},
        "history": history_summary(history),
    }
    trained = Model(bb, head, head.config(), meta)  # type: ignore[operator]
    trained.save(out)
    log.info("%s: %s head (fingerprint %s)", out, method, trained.fingerprint[:12])


def _image_file_suffixes() -> set[str]:
    """Suffixes of images and rasters, which are neither a folder of class folders nor a vector file of labels."""
    from geoir.io.scene import PLAIN_IMAGE_SUFFIXES, RASTER_SUFFIXES
    from geoir.training.data import IMAGE_SUFFIXES

    return {*IMAGE_SUFFIXES, *RASTER_SUFFIXES, *PLAIN_IMAGE_SUFFIXES}


def _check_class_sizes(labels: np.ndarray, classes: list[str], dataset: Path, test_fraction: float) -> None:
    """Fail before training when a class of DATASET is too small to hold some out and train on 2 of it."""
    import numpy as np

    from geoir.errors import DatasetError
    from geoir.training.protocols import min_class_size

    folder = dataset.is_dir()
    what = "image" if folder else "labelled tile"
    where = f"{dataset}" if folder else f"{dataset} (`label` column)"
    if len(classes) < 2:
        raise DatasetError(
            f"{where} gives {len(classes)} class ({', '.join(map(repr, classes))}); training needs at least 2: "
            + ("add a class folder" if folder else "label the geometries of another class")
        )
    need = min_class_size(1 - test_fraction) if test_fraction > 0 else 2
    counts = np.bincount(labels, minlength=len(classes))
    small = [(c, int(n)) for c, n in zip(classes, counts, strict=True) if n < need]
    if not small:
        return
    listed = ", ".join(f"{c!r} has {n}" for c, n in small[:5]) + (", ..." if len(small) > 5 else "")
    why = f"to train on 2 and hold out --test-fraction {test_fraction:g} for eval" if test_fraction > 0 else "to train"
    fix = "add images to those class folders or remove them" if folder else "label more tiles of those classes"
    if test_fraction > 0 and all(n >= 2 for _, n in small):
        fix += ", or pass --test-fraction 0 to hold none out"
    raise DatasetError(f"{where}: every class needs at least {need} {what}s {why}, but class {listed}; {fix}")


def _warn_without_validation(history: dict, test_fraction: float, what: str) -> None:
    """Say so when a head was trained without a validation split (its classes too small to give up one)."""
    from geoir.training.protocols import min_class_size

    heads, need = [], 0
    for name, h in history.items():
        val_fraction = float(h.get("config", {}).get("val_fraction", 0))
        if h.get("best_val_mAP") is not None or val_fraction <= 0:
            continue
        fit = next(m for m in range(2, 10_000) if min(round(val_fraction * m), m - 1) >= 1)
        heads.append(name)
        need = max(need, min_class_size(1 - test_fraction, fit) if test_fraction > 0 else fit)
    if heads:
        log.warning(
            "too few %ss per class to hold out a validation split, so the %s head of the last epoch is kept, "
            "not the best one on validation; classes of %d or more %ss give one",
            what,
            "/".join(heads),
            need,
            what,
        )
