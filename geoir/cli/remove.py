"""``geoir remove``: drop a scene, its tiles and its vectors from a bundle."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from geoir.cli.options import index_option, verbosity_options

log = logging.getLogger("geoir")


@click.command(short_help="Remove a scene and its tiles from a bundle.")
@click.argument("scene")
@index_option
@verbosity_options
def remove(scene: str, index_dir: str) -> None:
    """Remove SCENE (its id, path or file name) with its tiles and vectors from the bundle.

    \b
    Examples:
      $ geoir remove scene.tif
      $ geoir remove 9776f13dbe51b8ca --index naip-index
    """
    from geoir.errors import BundleError
    from geoir.index.bundle import Bundle

    bundle = Bundle.open(index_dir)
    matches = [
        r
        for r in bundle.scene_records()
        if scene in (r["id"], r["path"], Path(r["path"]).name) or Path(scene).resolve() == Path(r["path"])
    ]
    if not matches:
        raise BundleError(f"no scene {scene!r} in {index_dir}; `geoir info --index {index_dir}` lists them")
    if len(matches) > 1:
        raise BundleError(f"{scene!r} names {len(matches)} scenes; pass a scene id from `geoir info`")
    with bundle.lock():
        n = bundle.remove_scene(matches[0]["id"])
    log.info("%s: removed %s and its %d tiles", index_dir, Path(matches[0]["path"]).name, n)
