"""Training time of the default model's recipe, loop by loop, beside the plain-head baseline, in one run.

``geoir train ../shared/data/ucmerced --out m.pt`` in-process, timed: the backbone features of the 2,100
images in the views the recipe trains on (read from the feature cache when they are there, computed and
cached otherwise, or computed without the cache with ``--cold``), then every training loop of the recipe
(each progress bar ``geoir train`` shows, timed from its opening to its closing), on the same seed-0 80/20
split ``geoir train`` holds out. The baseline is the issue's plain head (``geoir train --method plain
--augment none``) on the same split. It also checks that the recipe reproduced the shipped default model
(the same fingerprint: backbone, head config and weights), so the times are those of the shipped model's
training. With ``--eval`` it also times ``geoir eval`` of the default model (5 seen + 3 unseen splits,
the recipe re-trained on each; about 35 min on 2 cores) as a subprocess.

    $ python benchmarks/train_time.py [--cold] [--eval]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _default_recipe import DATA  # noqa: E402
from _report import machine, table, write_section  # noqa: E402

from geoir.encoding.backbone import load_backbone  # noqa: E402
from geoir.encoding.model import Model, load_model  # noqa: E402
from geoir.training.data import cache_dir, image_folder_features  # noqa: E402
from geoir.training.protocols import stratified_split  # noqa: E402
from geoir.training.recipes import Recipe  # noqa: E402


class LoopTimer:
    """A progress factory (:data:`geoir.training.progress.Progress`) that times every bar instead of
    drawing it: one record per loop with its label, unit, total, steps taken and wall seconds."""

    def __init__(self) -> None:
        self.loops: list[dict[str, Any]] = []

    def __call__(self, total: int, label: str, unit: str) -> _TimedBar:
        record = {"loop": label, "unit": unit, "total": int(total), "steps": 0, "start": time.perf_counter()}
        self.loops.append(record)
        return _TimedBar(record)


class _TimedBar:
    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def update(self, n: int = 1) -> None:
        self.record["steps"] += n

    def close(self) -> None:
        self.record["seconds"] = time.perf_counter() - self.record.pop("start")
        print(
            f"  {self.record['loop']}: {self.record['steps']} {self.record['unit']}(s), {self.record['seconds']:.1f} s",
            flush=True,
        )


def cached_features() -> set[Path]:
    """The feature cache's files now (none when the cache folder does not exist yet)."""
    return set(cache_dir().glob("*.npz"))


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_training(recipe: Recipe, x: np.ndarray, y: np.ndarray, views: np.ndarray | None) -> dict[str, Any]:
    """Train ``recipe`` with a :class:`LoopTimer`; its head, loops, whole wall time and peak RSS."""
    timer = LoopTimer()
    t0 = time.perf_counter()
    head, _ = recipe.train(x, y, views=views, progress=timer)
    return {"head": head, "loops": timer.loops, "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cold", action="store_true", help="compute the features without the feature cache")
    ap.add_argument("--eval", action="store_true", help="also time `geoir eval` of the default model (~35 min)")
    args = ap.parse_args()
    if not DATA.exists():
        sys.exit(f"{DATA} not found: this benchmark needs ../shared/data/ucmerced")
    default = load_model("default")
    recipe = Recipe.from_dict(default.meta["recipe"])

    print("backbone features ...", flush=True)
    cached_before = cached_features()
    t0 = time.perf_counter()
    bb = load_backbone()
    data = image_folder_features(DATA, bb, augment=recipe.views_needed, use_cache=not args.cold)
    features_s = time.perf_counter() - t0
    new_files = cached_features() - cached_before
    source = "computed, no cache" if args.cold else ("computed and cached" if new_files else "read from the cache")
    n_views = 1 + (0 if data.views is None else len(data.views))
    features_rss = peak_rss_mb()

    # The split geoir train holds out with its defaults (--test-fraction 0.2, --seed 0).
    split = stratified_split(data.labels, 0.8, recipe.seed)
    tr = split.train
    x, y = data.features[tr], data.labels[tr]
    print(f"default recipe ({recipe.method}, {recipe.bits} bits, augment {recipe.augment}, refit {recipe.refit})")
    ours = timed_training(recipe, x, y, data.views_of(tr))
    fingerprint = Model(bb, ours["head"], ours["head"].config(), {}).fingerprint
    reproduced = fingerprint == default.fingerprint
    plain = Recipe(method="plain", bits=64, augment="none", seed=recipe.seed)
    print("baseline: plain head, 64 bits, no views")
    base = timed_training(plain, x, y, None)

    eval_s = None
    if args.eval:
        print("geoir eval of the default model ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "geoir", "-q", "eval", str(DATA), "--json", str(Path(tmp) / "report.json")],
                check=True,
            )
            eval_s = time.perf_counter() - t0

    rows: list[dict[str, Any]] = [
        {
            "step": f"backbone features, {len(data.labels):,} images x {n_views} views ({source})",
            "steps": f"{len(data.labels) * n_views:,} images",
            "seconds": round(features_s, 1),
            "s per step": round(features_s / (len(data.labels) * n_views), 4),
        }
    ]
    for who, run in (("default recipe", ours), ("baseline", base)):
        for loop in run["loops"]:
            rows.append(
                {
                    "step": f"{who}: {loop['loop']}",
                    "steps": f"{loop['steps']} {loop['unit']}s",
                    "seconds": round(loop["seconds"], 1),
                    "s per step": round(loop["seconds"] / max(loop["steps"], 1), 3),
                }
            )
        rows.append({"step": f"**{who}, whole training**", "seconds": round(run["seconds"], 1)})
    if eval_s is not None:
        rows.append(
            {
                "step": "`geoir eval` of the default model (8 splits, the recipe re-trained on each)",
                "seconds": round(eval_s, 1),
            }
        )
    ratio = ours["seconds"] / base["seconds"]
    threads = torch.get_num_threads()
    flags = (" --cold" if args.cold else "") + (" --eval" if args.eval else "")
    took = f"{ours['seconds'] / 60:.1f} min against {base['seconds']:.0f} s"
    same = f"{'yes' if reproduced else 'NO'} (fingerprint {fingerprint[:12]}, shipped {default.fingerprint[:12]})"
    rss = f"{features_rss:,.0f} MB after the features, {ours['peak_rss_mb']:,.0f} MB after the recipe's training"
    md = f"""## Training time (`benchmarks/train_time.py`): the default recipe loop by loop, and the plain-head baseline

`python benchmarks/train_time.py{flags}` on {machine()}; torch {torch.__version__}, {threads} threads.

UC Merced's {len(data.labels):,} images; training on the {len(tr):,} of `geoir train`'s seed-0 80/20 split
(the rest held out), the features in memory. Each loop is one progress bar of `geoir train`, timed from
its opening to its closing (the loops run one after another; the whole training adds the work between
them: the retention's principal axes, the gate's centroids). The baseline is the plain head (`geoir train
--method plain --augment none`) on the same split and single views. **The default recipe took
{ratio:.0f}x the baseline's training time** ({took}), and it reproduced the shipped default model: {same}.
Peak resident memory: {rss}.

{table(rows, ["step", "steps", "seconds", "s per step"])}
"""
    payload = {
        "machine": machine(),
        "torch": torch.__version__,
        "threads": threads,
        "cold": args.cold,
        "features": {"source": source, "seconds": features_s, "views": n_views, "peak_rss_mb": features_rss},
        "recipe": recipe.to_dict(),
        "default_recipe": {k: v for k, v in ours.items() if k != "head"},
        "baseline_plain": {k: v for k, v in base.items() if k != "head"},
        "fingerprint": fingerprint,
        "reproduces_default": reproduced,
        "eval_seconds": eval_s,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    write_section("training", md, payload)
    print(md)


if __name__ == "__main__":
    main()
