"""``geoir encode``: encode image files with geoir's encoder, or the tiles of a bundle not yet encoded."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from geoir.cli.options import (
    batch_options,
    default_workers,
    index_option,
    model_options,
    overwrite_option,
    progress_enabled,
    refuse_existing,
    refuse_missing_images,
    refuse_tta_change,
    resolve_model,
    tqdm_progress,
    tta_option,
    verbosity_options,
)
from geoir.io.files import atomic_target

log = logging.getLogger("geoir")


@click.command(short_help="Encode images, or a bundle's tiles not yet encoded.")
@click.argument("images", nargs=-1, metavar="[IMAGE...]")
@index_option
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the vectors of IMAGE files here: .npy (embeddings) or .npz (keys paths, features, embedding, codes).",
)
@overwrite_option
@model_options
@batch_options
@tta_option(
    "Encode every image or tile as the mean features of its 8 flips and quarter turns, as `geoir tile "
    "--tta` does (8 backbone passes each). A bundle records it, and one encoded without it refuses it."
)
@click.pass_context
@verbosity_options
def encode(
    ctx: click.Context,
    images: tuple[str, ...],
    index_dir: str,
    out: Path | None,
    overwrite: bool,
    model: str | None,
    backbone: str | None,
    weights: str | None,
    download: bool,
    device: str,
    batch_size: int,
    workers: int | None,
    tta: bool,
) -> None:
    """Encode IMAGE files to vectors, or (without IMAGE) encode the bundle's tiles that have no vectors.

    Images get the same preprocessing as tiles (a GeoTIFF is scaled with its own percentile
    statistics). A bundle's scenes left unencoded (`geoir tile --no-encode`, or an interrupted run)
    are read again, encoded and indexed.

    \b
    Examples:
      $ geoir encode a.png b.jpg --out vectors.npz
      $ geoir encode --index geoir-index --device cuda
      $ geoir encode query.png --tta --out query.npz    # to compare with a `geoir tile --tta` bundle
    """
    if images:
        if out is None:
            raise click.UsageError("encoding IMAGE files needs --out vectors.npy|vectors.npz")
        if out.suffix not in (".npy", ".npz"):
            raise click.BadParameter(f"{out}: use a .npy or .npz file", param_hint="'--out'")
        if workers:
            raise click.UsageError(
                "--workers sets the processes that read a bundle's scenes; IMAGE files are read here, one by one: "
                "leave it out"
            )
        refuse_existing(out, overwrite)
        refuse_missing_images(images)
        _encode_images(
            images,
            out,
            resolve_model(model, backbone, weights, download, device, tta=tta),
            batch_size,
            progress_enabled(ctx),
        )
        return
    if out is not None:
        raise click.UsageError("--out goes with IMAGE files; a bundle stores its own vectors")
    from geoir.encoding.run import encode_bundle
    from geoir.index.bundle import Bundle

    bundle = Bundle.open(index_dir)
    refuse_tta_change(index_dir, bundle.model, tta)
    encoder = resolve_model(model, backbone, weights, download, device, bundle.model, tta=tta or None)
    with bundle.lock():
        n = encode_bundle(
            bundle,
            encoder,
            batch_size=batch_size,
            workers=default_workers() if workers is None else workers,
            progress=tqdm_progress(progress_enabled(ctx)),
        )
    log.info("%s: %d tiles encoded", index_dir, n)


def _encode_images(images: tuple[str, ...], out: Path, model, batch_size: int, progress: bool) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    from geoir.io.images import read_image

    bar = tqdm_progress(progress)(len(images), "images", unit="image")
    try:
        # Consecutive images of one size share a batch (--batch-size); the backbone resizes each to its input.
        enc = model.encode_images((read_image(path).rgb for path in images), batch_size, on_batch=bar.update)
    finally:
        bar.close()
    emb = enc.embedding
    with atomic_target(out) as tmp:
        if out.suffix == ".npy":
            np.save(tmp, emb)
        else:
            arrays: dict[str, Any] = {
                "paths": np.array([str(p) for p in images]),
                "embedding": emb,
                "features": enc.features,
            }
            if enc.codes is not None:
                arrays["codes"] = enc.codes
            np.savez(tmp, **arrays)
    log.info("%s: %d vectors of %d dimensions", out, *emb.shape)
