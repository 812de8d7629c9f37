"""``geoir remove``: drop a scene, its tiles and its vectors from a bundle."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from geoir.cli.options import index_option, verbosity_options

log = logging.getLogger("geoir")


@click.command(short_help="Remove scenes and their tiles from a bundle.")
@click.argument("scenes", nargs=-1, required=True, metavar="SCENE...")
@index_option
@verbosity_options
def remove(scenes: tuple[str, ...], index_dir: str) -> None:
    """Remove each SCENE (its id, path or file name) with its tiles and vectors from the bundle.

    Every SCENE is looked up before any is removed: one that names no scene, or several, removes none.

    \b
    Examples:
      $ geoir remove scene.tif
      $ geoir remove 9776f13dbe51b8ca --index naip-index
      $ geoir remove 2019_a.tif 2019_b.tif
    """
    from geoir.errors import BundleError
    from geoir.index.bundle import Bundle

    bundle = Bundle.open(index_dir)
    records = bundle.scene_records()
    chosen: dict[str, str] = {}  # id -> path, in the order given
    for scene in scenes:
        matches = [
            r
            for r in records
            if scene in (r["id"], r["path"], Path(r["path"]).name) or Path(scene).resolve() == Path(r["path"])
        ]
        if not matches:
            raise BundleError(f"no scene {scene!r} in {index_dir}; `geoir info --index {index_dir}` lists them")
        if len(matches) > 1:
            raise BundleError(f"{scene!r} names {len(matches)} scenes; pass a scene id from `geoir info`")
        chosen.setdefault(matches[0]["id"], matches[0]["path"])
    with bundle.lock():
        for scene_id, path in chosen.items():
            n = bundle.remove_scene(scene_id)
            log.info("%s: removed %s and its %d tiles", index_dir, Path(path).name, n)
