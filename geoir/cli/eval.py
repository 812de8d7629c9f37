"""``geoir eval``: a model's recipe and the backbone under the papers' retrieval protocols."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import click

from geoir.cli.options import (
    SeedsType,
    expand_option,
    overwrite_option,
    progress_enabled,
    refuse_existing,
    tqdm_progress,
    verbosity_options,
    weights_options,
)
from geoir.io.files import atomic_write_text, check_writable_folder
from geoir.io.vectors import VectorPathType

log = logging.getLogger("geoir")


def _refuse_existing_splits(splits_dir: Path, names: list[str], overwrite: bool) -> None:
    """Fail before any work when split files would replace others without --overwrite, or cannot be written."""
    existing = [n for n in names if (splits_dir / n).exists()]
    if existing and not overwrite:
        shown = ", ".join(existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise click.ClickException(
            f"{splits_dir} already holds {shown}; pass --overwrite to replace them, or another --splits-dir"
        )
    # The folder is made only when the split files are written, at the end.
    check_writable_folder(splits_dir, "split files under")


@click.command(name="eval", short_help="Evaluate a model on a labelled data set (mAP, P@k, ANMRR).")
@click.argument("dataset", type=VectorPathType())
@click.option(
    "--model",
    "model_path",
    default=None,
    metavar="FILE|default",
    help="Model whose recipe is evaluated [default: the shipped default model].",
)
@click.option(
    "--protocol",
    type=click.Choice(["seen", "test", "reference", "unseen"]),
    multiple=True,
    default=("seen", "unseen"),
    show_default=True,
    help="seen: 80/20 splits, test queries vs train+test, all encoded by the network (SRL's P2); "
    "test: the same splits, test queries vs the other test images (SRL's P1); reference: the same splits, "
    "test queries vs the training images, codes vs the codes the hash head learned for them (the DGSSH "
    "code's protocol T); unseen: train on 15 classes, all-vs-all on the others (the default leaves it out for "
    "fewer than 17 classes). Repeatable.",
)
@click.option(
    "--seeds", type=SeedsType(), default="0,1,2,3,4", show_default=True, help="Seeds of the seen-class splits."
)
@click.option(
    "--unseen-seeds", type=SeedsType(), default="0,1,2", show_default=True, help="Seeds of the unseen-class splits."
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path, allow_dash=True),
    required=True,
    help="Report file (JSON); - writes it to stdout, and the table to stderr.",
)
@click.option(
    "--pr-curve",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also draw the precision-recall curves (a .png file).",
)
@click.option(
    "--splits-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write the split lists (JSON, with image paths) here: seen_seedN.json, unseen_seedN.json.",
)
@click.option(
    "--tta",
    is_flag=True,
    help="Score every image by the mean features of its 8 flips and quarter turns, as `geoir tile --tta` "
    "encodes (8 backbone passes per image the first time; heads still train on single views).",
)
@expand_option(
    "Score every ranking, the backbone's too, after query expansion with the first N items, as "
    "`geoir search --expand N` searches (0: off)."
)
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="Image reader processes.")
@click.option(
    "--index",
    "index_dir",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    envvar="GEOIR_INDEX",
    help="Bundle whose tiles a vector DATASET labels (its stored features are scored; for a model whose "
    "recipe trains without views, e.g. one trained on those labels; env: GEOIR_INDEX).",
)
@weights_options
@overwrite_option
@click.pass_context
@verbosity_options
def evaluate(
    ctx: click.Context,
    dataset: Path,
    model_path: str | None,
    protocol: tuple[str, ...],
    seeds: tuple[int, ...],
    unseen_seeds: tuple[int, ...],
    json_out: Path,
    pr_curve: Path | None,
    splits_dir: Path | None,
    tta: bool,
    expand: int,
    workers: int,
    index_dir: str | None,
    weights: str | None,
    download: bool,
    overwrite: bool,
) -> None:
    """Evaluate a model's recipe on DATASET under the papers' protocols.

    DATASET is a folder of class folders (like UC Merced), or a vector file of labelled geometries with
    --index (FILE:LAYER for one layer of several), whose tiles' stored features are scored (as
    `geoir train` takes them).

    For each split the recipe recorded in the model is trained again on that split's training part,
    so no score comes from images the head saw; the backbone alone is scored under the same splits.
    mAP is over the full ranking with ties broken by database index; also mAP@k (DGSSH's: divided by
    the relevant items in the top k, so it rewards their order, not their number; P@k counts them),
    P@k and ANMRR.
    The report also records, per split, what validation chose for the head re-trained on it (best
    epochs, retention angle or gate, code weight); the means over the seeds are printed as a table.
    Re-training per split takes time: the first example (the default model's recipe, 5 + 3 splits) ran 35
    minutes on 2 CPU cores for UC Merced's 2,100 images (docs/benchmarks.md); --seeds 0 --unseen-seeds 0
    scores one split of each kind.

    \b
    Examples:
      $ geoir eval ucmerced/ --json report.json
      $ geoir eval ucmerced/ --model ucm.pt --protocol seen --seeds 0 --json r.json --pr-curve pr.png
      $ geoir eval ucmerced/ --protocol test --protocol reference --json papers.json
      $ geoir eval ucmerced/ --tta --json report_tta.json
      $ geoir eval ucmerced/ --expand 5 --json report_expand5.json
      $ geoir eval ucmerced/ --protocol seen --json - | jq .model_fingerprint
      $ geoir eval labels.gpkg --index geoir-index --model mine.pt --protocol seen --json mine.json
    """
    from geoir.cli.train import check_dataset_kind
    from geoir.encoding.model import load_model
    from geoir.training.data import image_folder_features, list_image_folder
    from geoir.training.evaluation import check_protocols, run_protocols, split_files, summary_table, write_pr_curve

    # Every output and every protocol is checked before the model is trained once.
    index_dir = check_dataset_kind(dataset, index_dir, ctx)
    if index_dir is not None and tta:
        raise click.UsageError(
            "--tta averages the 8 flips and quarter turns of every sample's pixels, and a bundle keeps only its "
            "tiles' features; leave --tta out"
        )
    if pr_curve is not None and pr_curve.suffix.lower() != ".png":
        raise click.BadParameter(
            f"{pr_curve}: the curves are drawn as a PNG; use a .png file", param_hint="'--pr-curve'"
        )
    if pr_curve is not None and "seen" not in protocol:
        raise click.BadParameter(
            "the curves are the seen protocol's (first seed); add --protocol seen, or leave --pr-curve out",
            param_hint="'--pr-curve'",
        )
    to_stdout = str(json_out) == "-"
    refuse_existing(json_out, overwrite, stdout_ok=True)
    if pr_curve is not None:
        refuse_existing(pr_curve, overwrite)
    defaulted = ctx.get_parameter_source("protocol") == click.core.ParameterSource.DEFAULT
    if index_dir is None:  # a folder's classes are known before the model is loaded; a bundle's labels after
        _, labels, classes = list_image_folder(dataset)
        protocol = _protocols_for(protocol, classes, dataset, defaulted)
        check_protocols(labels, classes, protocol, source=str(dataset))
        if splits_dir is not None:
            _refuse_existing_splits(splits_dir, split_files(protocol, seeds, unseen_seeds), overwrite)
    model = load_model(model_path or "default", weights=weights, download=download)
    if model.head is None or "recipe" not in model.meta:
        raise click.ClickException(
            f"{model_path or 'the default model'} has no training recipe to evaluate; "
            "pass a model written by `geoir train`"
        )
    from geoir.training.recipes import Recipe

    recipe = Recipe.from_dict(model.meta["recipe"])
    if index_dir is not None:
        data = _bundle_data(dataset, index_dir, model, recipe, model_path or "the default model")
        protocol = _protocols_for(protocol, data.classes, dataset, defaulted)
        check_protocols(data.labels, data.classes, protocol, source=str(dataset), unit="labelled tiles")
        if splits_dir is not None:
            _refuse_existing_splits(splits_dir, split_files(protocol, seeds, unseen_seeds), overwrite)
    else:
        data = image_folder_features(
            dataset,
            model.backbone,
            workers=workers,
            progress=tqdm_progress(progress_enabled(ctx)),
            # Test-time averaging needs every view, even for a recipe that trains on none.
            augment="dihedral" if tta else recipe.views_needed,
        )
    report = run_protocols(
        model,
        data,
        protocol,
        seeds,
        unseen_seeds,
        splits_dir=splits_dir,
        log=lambda s: log.info("%s", s),
        tta=tta,
        expand=expand,
        progress=tqdm_progress(progress_enabled(ctx)),
    )
    # Which model: its recorded name is the stem of the file it was trained to, so the file and the fingerprint.
    which = {"model": report["model"], "model_file": model_path or "default", "model_fingerprint": model.fingerprint}
    report = {**which, **report}
    # The table first: a report that cannot be written (a full disk) must not take the results with it.
    click.echo(summary_table(report), err=to_stdout)
    if pr_curve is not None:
        write_pr_curve(report, pr_curve)
    if to_stdout:
        click.echo(json.dumps(report, indent=1, default=float))
    else:
        atomic_write_text(json_out, json.dumps(report, indent=1, default=float))
        log.info("%s written", json_out)


def _protocols_for(
    protocol: tuple[str, ...], classes: Sequence[str], dataset: Path, defaulted: bool
) -> tuple[str, ...]:
    """The protocols to run: the default ones leave out unseen for a data set with too few classes for it.

    A protocol asked for by name is kept, for :func:`~geoir.training.evaluation.check_protocols` to refuse.
    """
    from geoir.training.evaluation import UNSEEN_TRAIN_CLASSES

    need = UNSEEN_TRAIN_CLASSES + 2
    if not defaulted or "unseen" not in protocol or len(classes) >= need:
        return protocol
    log.warning(
        "%s has %d classes; the unseen protocol trains on %d and holds out at least 2 more, so it is left out "
        "(it needs at least %d)",
        dataset,
        len(classes),
        UNSEEN_TRAIN_CLASSES,
        need,
    )
    return tuple(p for p in protocol if p != "unseen")


def _bundle_data(dataset: Path, index_dir: str, model, recipe, name: str):  # type: ignore[no-untyped-def]
    """The labelled tiles of a bundle, as features of the model's backbone (checked before any training)."""
    from geoir.index.bundle import Bundle
    from geoir.training.data import bundle_features

    if recipe.views_needed != "none":
        raise click.ClickException(
            f"{name} trains with --augment {recipe.augment}, on the 8 flips and quarter turns of every sample's "
            f"pixels, and {index_dir} keeps only its tiles' features; evaluate a model trained on these labels "
            f"(`geoir train {dataset} --index {index_dir} --out MODEL`), whose recipe needs none"
        )
    bundle = Bundle.open(index_dir)
    data = bundle_features(dataset, bundle)
    if data.backbone_fingerprint != model.backbone.fingerprint:
        raise click.ClickException(
            f"{index_dir} was encoded with another backbone ({(bundle.model or {}).get('backbone')}, fingerprint "
            f"{data.backbone_fingerprint[:12]}) than {name} ({model.backbone.name}, "
            f"{model.backbone.fingerprint[:12]}); evaluate a model trained on that bundle's features"
        )
    return data
