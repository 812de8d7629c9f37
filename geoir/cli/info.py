"""``geoir info``: describe an index bundle."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import click

from geoir.cli.options import index_option, verbosity_options, weights_options

log = logging.getLogger("geoir")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


@click.command(short_help="Describe an index bundle or a model file.")
@click.argument("target", required=False, metavar="[BUNDLE|MODEL]")
@index_option
@click.option(
    "--model",
    "model_file",
    metavar="FILE|default",
    default=None,
    help="Describe this model file from `geoir train` ('default': the shipped model) instead of a bundle: "
    "backbone, head, recipe, training data, held-out split and validation figures.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@weights_options
@verbosity_options
@click.pass_context
def info(
    ctx: click.Context,
    target: str | None,
    index_dir: str,
    model_file: str | None,
    as_json: bool,
    weights: str | None,
    download: bool,
) -> None:
    """Print a bundle's counts, scenes, model, index kinds and sizes, or what a model file records.

    The bundle or model may be named as the argument: a model file (.pt) or 'default' is described as
    --model describes it, anything else is read as a bundle directory, as --index is.

    \b
    Examples:
      $ geoir info
      $ geoir info naip-index
      $ geoir info --index naip-index --json | jq .model
      $ geoir info default
      $ geoir info ucm.pt --json | jq .meta.history
    """
    if target is not None:
        index_dir, model_file = _target(ctx, target, model_file)
    if model_file is not None:
        _model_info(model_file, as_json, weights, download)
        return
    from geoir.index.bundle import INDEX_FILES, Bundle

    bundle = Bundle.open(index_dir)
    records = bundle.scene_records()
    encoded = set(bundle.encoded_scene_ids())
    expected = bundle.encoded_tiles()
    data = {
        "path": str(bundle.path),
        "format_version": bundle.manifest["format_version"],
        "tiling": bundle.manifest["tiling"],
        # From the committed scenes, not the manifest's counts: a run killed between its commit and the
        # manifest's update leaves those stale until the next writer corrects them.
        "counts": {"scenes": len(records), "tiles": int(sum(r["n_tiles"] for r in records))},
        "model": bundle.model,
        "index": {
            kind: {
                "factory": (bundle.manifest.get("index") or {}).get(kind),
                "bytes": _size(bundle.path / name),
                **_index_state(bundle.path / name, expected),
            }
            for kind, name in INDEX_FILES.items()
            if (bundle.path / name).exists()
        },
        "bytes": {
            "catalog": _size(bundle.catalog_path),
            "vectors": _size(bundle.path / "vectors"),
            "total": _size(bundle.path),
        },
        "scenes": [
            {
                "id": r["id"],
                "path": r["path"],
                **_crs_fields(r["crs"]),
                "tiles": r["n_tiles"],
                "encoded": r["id"] in encoded,
                "added": r["added"],
                # How its pixels become the model's RGB (queries cut from it are read the same way).
                "dtype": r["dtype"],
                "bands": r["bands"],
                "nodata": r["nodata"],
                "stretch": r["scaling"] if r["scaling"].get("low") is not None else None,
            }
            for r in records
        ],
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    m = bundle.model
    _say(f"bundle   {data['path']}")
    _say(
        f"tiles    {data['counts']['tiles']} in {data['counts']['scenes']} scene(s); "
        f"size {bundle.params.size} px, stride {bundle.params.stride} px"
        + (f", gsd {bundle.params.gsd:g} m" if bundle.params.gsd else "")
    )
    if m:
        code = f", {m['bits']}-bit codes" if m.get("bits") else ""
        code += ", averaged over 8 turns (--tta)" if m.get("backbone_tta") else ""
        _say(
            f"model    {m.get('name')} ({m['backbone']}, {m['embedding_dim']}-d embedding{code}); "
            f"fingerprint {m['fingerprint'][:12]}"
        )
    else:
        _say("model    none (not encoded)")
    for kind, d in data["index"].items():
        state = d.get("problem") or f"{d['vectors']} vectors"
        _say(f"index    {kind}: {d['factory'] or 'exact (flat)'}, {state}, {_human_bytes(d['bytes'])}")
    _say(f"size     {_human_bytes(data['bytes']['total'])} on disk")
    for s in data["scenes"]:
        flag = "" if s["encoded"] else "  (not encoded)"
        read = f"bands {','.join(map(str, s['bands']))}"
        if s["stretch"]:
            pairs = [f"{lo:.6g}..{hi:.6g}" for lo, hi in zip(s["stretch"]["low"], s["stretch"]["high"], strict=True)]
            read += f", {s['dtype']} stretched {pairs[0] if len(set(pairs)) == 1 else ' '.join(pairs)}"
            read += ", fixed" if s["stretch"].get("fixed") else ""
        _say(f"scene    {s['id']}  {s['tiles']:>7} tiles  {s['crs']:<12} {s['path']}{flag}  ({read})")


def _human_bytes(n: int) -> str:
    """A byte count for people: '2.3 kB', '2.41 MB', '1.20 GB' (decimal units, as ``ls --si``)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.{1 if unit == 'kB' else 2}f} {unit}"
    return f"{n} B"


def _target(ctx: click.Context, target: str, model_file: str | None) -> tuple[str, str | None]:
    """``(index_dir, model_file)`` for a positional TARGET: a file (whatever its suffix: ``m.pth`` read as a
    bundle was told to pass --index), a name ending .pt or 'default' is a model, anything else a bundle;
    naming the bundle or model twice (TARGET and --index/--model) is refused."""
    from click.core import ParameterSource

    if model_file is not None or ctx.get_parameter_source("index_dir") is ParameterSource.COMMANDLINE:
        given = "--model" if model_file is not None else "--index"
        raise click.UsageError(f"{target!r} and {given} both name what to describe; give one of them")
    if target == "backbone":
        raise click.BadParameter(
            "'backbone' is no model file; pass a file from `geoir train` or 'default' "
            "(a bundle directory named backbone: --index backbone)",
            param_hint="'[BUNDLE|MODEL]'",
        )
    if target == "default" or Path(target).suffix.lower() == ".pt" or Path(target).is_file():
        return "geoir-index", target
    return target, None


def _say(line: str) -> None:
    """Echo a line of text whose parts come from files (a model's name, a scene's path): their control
    characters shown escaped, so a newline or a terminal escape in a received file cannot forge a line."""
    click.echo(_CONTROL.sub(lambda m: repr(m.group())[1:-1], line))


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _model_info(model_file: str, as_json: bool, weights: str | None = None, download: bool = False) -> None:
    """What a model file records: :meth:`Model.describe` and its metadata (recipe, data, split, history)."""
    from geoir.encoding.model import load_model

    if model_file == "backbone":
        raise click.BadParameter(
            "'backbone' is no model file; pass a file from `geoir train`, or 'default'", param_hint="'--model'"
        )
    if model_file != "default" and not Path(model_file).exists():
        raise click.ClickException(f"model file {model_file} not found; pass a file from `geoir train`, or 'default'")
    # A model on a backbone whose weights are not packaged loads with the --weights it was trained with.
    model = load_model(model_file, weights=weights, download=download)
    desc, meta = model.describe(), model.meta
    if as_json:
        click.echo(json.dumps({"model": desc, "meta": meta}, indent=2, default=str))
        return
    head = desc["head"] or {}
    _say(f"model       {desc['name']} ({desc['path']})")
    _say(f"fingerprint {desc['fingerprint'][:12]}")
    pre = desc["preprocess"]
    taps = desc["backbone_taps"]
    pooled = f"blocks {', '.join(map(str, taps))} and the head, pooled" if taps else "the head, pooled"
    _say(
        f"backbone    {desc['backbone']}, {desc['feature_dim']} features ({pooled}); "
        f"input {pre['input_size'][0]} px, {pre['interpolation']}"
        + (", 8 turns averaged" if desc["backbone_tta"] else "")
    )
    parts = [f"{desc['embedding_dim']}-d float embedding"] if model.kind not in ("hash", "plain") else []
    if desc["bits"]:
        parts.append(f"{desc['bits']}-bit codes")
    if head.get("gate"):
        lo, hi, tau = head["gate"][:3]
        parts.append(f"retention gate {lo:.2f}..{hi:.2f} rad at confidence {tau:.2f}")
    elif head.get("retain"):
        parts.append(f"retention {head['retain']:.2f} rad")
    if head.get("fuse"):
        parts.append(f"the code's continuous output in the float embedding at weight {head['fuse']:g}")
    _say(f"head        {model.kind}: {', '.join(parts)}")
    try:
        _meta_lines(meta)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        _say(f"meta        (not as geoir writes it: {type(exc).__name__}: {str(exc)[:80]}; the file was edited?)")


def _meta_lines(meta: dict) -> None:  # type: ignore[type-arg]
    """The lines of ``geoir info MODEL`` that come from its training record."""
    recipe = meta.get("recipe")
    if recipe:
        from geoir.errors import GeoirError
        from geoir.training.recipes import Recipe

        try:
            shown = Recipe.from_dict(recipe).applied()
        except (GeoirError, TypeError):  # a recipe this release cannot read: as recorded
            shown = {k: v for k, v in recipe.items() if k != "options" and v is not None}
        opts = " ".join(f"{k}={v}" for k, v in shown.items())
        _say(f"recipe      {opts}" + (f" options={recipe['options']}" if recipe.get("options") else ""))
    data = meta.get("data")
    if data:
        digest = f" (items sha256 {data['items_sha256'][:12]})" if data.get("items_sha256") else ""
        _say(
            f"data        {data.get('dataset')}: {data.get('samples')} samples, {data.get('classes')} classes{digest}"
            + (" of --tta features (encode with --tta)" if data.get("features_tta") else "")
        )
    split = meta.get("split")
    if split:
        _say(
            f"held out    {len(split.get('test_items', []))} for evaluation "
            f"(test fraction {split.get('test_fraction')}, seed {split.get('seed')})"
        )
    for part, h in (meta.get("history") or {}).items():
        if isinstance(h, dict) and h.get("best_val_mAP") is not None:
            refit = h.get("refit")
            again = f"; then re-trained on all {refit['items']} items" if isinstance(refit, dict) else ""
            _say(f"validation  {part}: mAP {h['best_val_mAP']:.3f} at epoch {h.get('best_epoch')}{again}")


def _index_state(path: Path, expected: int) -> dict[str, object]:
    """How many vectors an index file holds, or what is wrong with it (a search repairs both)."""
    from geoir.errors import BundleError
    from geoir.index.vectors import VectorIndex

    try:
        n = VectorIndex.count(path)
    except BundleError as exc:
        log.warning("%s", exc)
        return {"vectors": None, "problem": "unreadable (see the warning above)"}
    if n != expected:
        problem = f"{n} vectors, not the {expected} of the encoded scenes (the next search rebuilds it)"
        log.warning("%s holds %s", path, problem)
        return {"vectors": n, "problem": problem}
    return {"vectors": n}


def _crs_fields(stored: str) -> dict[str, str]:
    """A scene's CRS as ``crs`` (a short label) and ``crs_wkt`` (whole)."""
    from rasterio.crs import CRS

    from geoir.io.scene import crs_label

    crs = CRS.from_user_input(stored)
    return {"crs": crs_label(crs), "crs_wkt": str(crs.to_wkt())}
