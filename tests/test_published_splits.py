"""The split lists published in benchmarks/splits/ucmerced are the ones the protocols draw.

docs/results.md's UC Merced figures come from these splits (`geoir eval --splits-dir` wrote them). Each
file lists indexes and the image paths they stand for; the labels are the class folders of those
paths, so the draw can be checked again without the images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from geoir.training.data import list_image_folder
from geoir.training.protocols import Split, stratified_split, unseen_class_split
from tests.conftest import REPO, UCMERCED, needs_repo_file, needs_shared_data

PUBLISHED = REPO / "benchmarks" / "splits" / "ucmerced"
FILES = sorted(PUBLISHED.glob("*.json"))
pytestmark = needs_repo_file("benchmarks/splits/ucmerced/seen_seed0.json")


def _paths_and_labels(d: dict) -> tuple[list[str], np.ndarray]:
    n = len(d["train"]) + len(d["test"])
    paths = [""] * n
    for key in ("train", "test"):
        for i, p in zip(d[key], d[f"{key}_paths"], strict=True):
            paths[i] = p
    classes = sorted({p.split("/")[0] for p in paths})
    return paths, np.array([classes.index(p.split("/")[0]) for p in paths])


def test_every_protocol_seed_is_published() -> None:
    names = [f.name for f in FILES]
    assert names == [f"seen_seed{s}.json" for s in range(5)] + [f"unseen_seed{s}.json" for s in range(3)]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_published_split_is_the_protocols_draw(path: Path) -> None:
    d = json.loads(path.read_text())
    paths, labels = _paths_and_labels(d)
    # Every image appears once, under its index, and UC Merced has 21 classes of 100.
    assert all(paths) and len(set(paths)) == 2100
    assert np.bincount(labels).tolist() == [100] * 21
    seed = int(d["seed"])
    draw = stratified_split(labels, 0.8, seed) if path.stem.startswith("seen") else unseen_class_split(labels, 15, seed)
    assert draw.train.tolist() == d["train"] and draw.test.tolist() == d["test"]
    assert Split.from_json(path.read_text()).seed == seed
    if path.stem.startswith("unseen"):
        # The held-out classes are whole: none of their images is in train.
        assert not set(labels[d["train"]]) & set(labels[d["test"]]) and len(set(labels[d["test"]])) == 6


@needs_shared_data("ucmerced")
def test_published_paths_are_the_dataset_order() -> None:
    files, _, _ = list_image_folder(UCMERCED)
    order = [p.relative_to(UCMERCED).as_posix() for p in files]
    paths, _ = _paths_and_labels(json.loads(FILES[0].read_text()))
    assert paths == order
