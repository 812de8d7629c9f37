"""``geoir eval``: a model's recipe and the backbone under the papers' retrieval protocols."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from geoir.cli.options import overwrite_option, progress_enabled, refuse_existing, tqdm_progress

log = logging.getLogger("geoir")


@click.command(name="eval", short_help="Evaluate a model on a labelled data set (mAP, P@k, ANMRR).")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--model",
    "model_path",
    default=None,
    metavar="FILE|default",
    help="Model whose recipe is evaluated [default: the shipped default model].",
)
@click.option(
    "--protocol",
    type=click.Choice(["seen", "unseen", "reference"]),
    multiple=True,
    default=("seen", "unseen"),
    show_default=True,
    help="seen: 80/20 splits, test queries vs train+test encoded by the network; unseen: train on "
    "15 classes, all-vs-all on the other 6; reference: DGSSH code's protocol T.",
)
@click.option("--seeds", default="0,1,2,3,4", show_default=True, help="Seeds of the seen-class splits.")
@click.option("--unseen-seeds", default="0,1,2", show_default=True, help="Seeds of the unseen-class splits.")
@click.option(
    "--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Report file (JSON)."
)
@click.option(
    "--pr-curve",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also draw the precision-recall curves (PNG).",
)
@click.option(
    "--splits-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write the split lists (JSON, with image paths) here.",
)
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="Image reader processes.")
@overwrite_option
@click.pass_context
def evaluate(
    ctx: click.Context,
    dataset: Path,
    model_path: str | None,
    protocol: tuple[str, ...],
    seeds: str,
    unseen_seeds: str,
    json_out: Path,
    pr_curve: Path | None,
    splits_dir: Path | None,
    workers: int,
    overwrite: bool,
) -> None:
    """Evaluate a model's recipe on DATASET (a folder of class folders) under the papers' protocols.

    For each split the recipe recorded in the model is trained again on that split's training part,
    so no score comes from images the head saw; the backbone alone is scored under the same splits.
    mAP is over the full ranking with ties broken by database index; also mAP@k, P@k and ANMRR.

    \b
    Examples:
      $ geoir eval ucmerced/ --json report.json
      $ geoir eval ucmerced/ --model ucm.pt --protocol seen --seeds 0 --json r.json --pr-curve pr.png
    """
    from geoir.encoding.model import load_model
    from geoir.training.data import image_folder_features
    from geoir.training.evaluation import run_protocols, write_pr_curve

    refuse_existing(json_out, overwrite)
    model = load_model(model_path or "default")
    if model.head is None or "recipe" not in model.meta:
        raise click.ClickException(
            f"{model_path or 'the default model'} has no training recipe to evaluate; "
            "pass a model written by `geoir train`"
        )
    from geoir.training.recipes import Recipe

    data = image_folder_features(
        dataset,
        model.backbone,
        workers=workers,
        progress=tqdm_progress(progress_enabled(ctx)),
        augment=Recipe.from_dict(model.meta["recipe"]).views_needed,
    )
    report = run_protocols(
        model,
        data,
        protocol,
        [int(s) for s in seeds.split(",")],
        [int(s) for s in unseen_seeds.split(",")],
        splits_dir=splits_dir,
        log=lambda s: log.info("%s", s),
    )
    tmp = json_out.with_name(f".{json_out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=float))
    tmp.replace(json_out)
    if pr_curve is not None:
        write_pr_curve(report, pr_curve)
    log.info("%s written", json_out)
