"""The README's commands stay true: CI runs its test command verbatim; every command has an example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from geoir.cli import cli
from tests.conftest import REPO as ROOT
from tests.conftest import needs_repo_file


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [b.strip() for b in re.findall(r"```\n(python3 -m venv[^`]*)```", text)]


@needs_repo_file("README.md", ".ci/run")
def test_ci_runs_readme_test_command() -> None:
    install, tests = readme_commands()
    assert "examples/demo.py" in install
    assert "pytest" in tests
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines


def test_every_command_help_has_an_example() -> None:
    runner = CliRunner()
    for name in cli.list_commands(None):  # type: ignore[arg-type]
        r = runner.invoke(cli, [name, "--help"])
        assert r.exit_code == 0, r.output
        assert f"$ geoir {name}" in r.output, f"`geoir {name} --help` has no example"


@needs_repo_file("docs/gen_cli.py", "docs/cli.md")
def test_cli_reference_is_current() -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "docs" / "gen_cli.py"), "--check"])
    assert r.returncode == 0, "docs/cli.md is stale: run `python docs/gen_cli.py`"


@needs_repo_file("pyproject.toml", "README.md", "LICENSE")
def test_wheel_ships_model_and_style(tmp_path: Path) -> None:
    """A regular (non-editable) install carries the default model and the QGIS style."""
    import shutil
    import subprocess
    import sys
    import zipfile

    # Build from a clean copy: an in-tree build/ folder would carry files from earlier builds.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "geoir", src / "geoir", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(src),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    names = zipfile.ZipFile(next(tmp_path.glob("geoir-*.whl"))).namelist()
    assert "geoir/models/default.pt" in names and "geoir/output/styles/hits.qml" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)  # Apache-2.0 goes with every copy


def test_sdist_carries_what_its_tests_read(tmp_path: Path) -> None:
    """A packager runs the tests from the unpacked sdist: conftest, the examples, docs and splits they read."""
    import shutil
    import subprocess
    import sys
    import tarfile

    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the sdist is built from the tracked files")
    src = tmp_path / "src"
    for name in listed.stdout.splitlines():
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, src / name)
    build = f"from setuptools import build_meta as b; print(b.build_sdist({str(tmp_path)!r}))"
    r = subprocess.run([sys.executable, "-c", build], cwd=src, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with tarfile.open(tmp_path / r.stdout.split()[-1]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {
        "LICENSE", "tests/conftest.py", "tests/qgis_probe.py", "examples/demo.py", "docs/gen_cli.py", "docs/cli.md",
        ".ci/run", "benchmarks/splits/ucmerced/seen_seed0.json", "geoir/models/default.pt",
    }  # fmt: skip
    assert needed <= names, needed - names
    assert not any("__pycache__" in n for n in names)


def _field_table(text: str, heading: str) -> list[str]:
    """The field names (first column) of the table under a ``### `heading`...`` heading of docs/outputs.md."""
    section = text.split(f"### `{heading}`", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE)


@needs_repo_file("docs/outputs.md")
def test_outputs_doc_lists_every_field_geoir_writes(tmp_path: Path) -> None:
    """docs/outputs.md's field tables are the columns of the layers as written, in their order."""
    import geopandas as gpd
    import numpy as np
    import pyogrio
    import rasterio
    from affine import Affine

    from geoir.output.writers import query_frame
    from geoir.retrieval.engine import HIT_DTYPES, merge_hits

    text = (ROOT / "docs" / "outputs.md").read_text()
    assert _field_table(text, "hits") == list(HIT_DTYPES)
    no_hits = gpd.GeoDataFrame(geometry=[], crs="EPSG:4326")
    assert _field_table(text, "hits_merged") == [c for c in merge_hits(no_hits).columns if c != "geometry"]
    assert _field_table(text, "query") == [c for c in query_frame().columns if c != "geometry"]
    scene = tmp_path / "s.tif"
    profile = {"driver": "GTiff", "width": 256, "height": 256, "count": 3, "dtype": "uint8", "crs": "EPSG:32618"}
    with rasterio.open(scene, "w", **profile, transform=Affine(1, 0, 500_000, 0, -1, 4_000_000)) as dst:
        dst.write(np.random.default_rng(0).integers(0, 255, (3, 256, 256), dtype=np.uint8))
    r = CliRunner().invoke(cli, ["-q", "tile", str(scene), "--index", str(tmp_path / "i"), "--no-encode"])
    assert r.exit_code == 0, r.output
    for layer in ("tiles", "scenes"):
        fields = pyogrio.read_info(tmp_path / "i" / "catalog.gpkg", layer=layer)["fields"].tolist()
        assert _field_table(text, layer) == fields, layer
