"""Heads (init, codes, serialisation), training loops on synthetic features, and evaluation protocols."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geoir.errors import DatasetError, ModelError
from geoir.training.defaults import BITS
from geoir.training.fit import (
    FUSE_WEIGHTS,
    GATE_ANGLES_HI,
    GATE_ANGLES_LO,
    GATE_TAUS,
    RETAIN_ANGLES,
    RETAIN_DEFAULT_ANGLE,
    balanced_chunks,
    class_holdout,
    dgssh_batches,
    stratified_holdout,
    train_dgssh,
    train_plain,
    train_srl,
    warmup_cosine,
)
from geoir.training.heads import (
    HEADS,
    CombinedHead,
    HashHead,
    PlainHead,
    SRLHead,
    get_head,
    head_from_config,
    pca_whitening,
)
from geoir.training.losses import SRLLoss
from geoir.training.metrics import evaluate_retrieval
from geoir.training.protocols import (
    Split,
    evaluate_seen,
    evaluate_unseen,
    min_class_size,
    split_train_size,
    stratified_split,
    summarize,
    unseen_class_split,
)

UCMERCED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ucmerced"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny matmuls: one thread avoids OpenMP spin-waiting, which makes these tests 10-100x slower on a
    # busy 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _clusters(n_classes: int = 5, per_class: int = 24, dim: int = 16, spread: float = 1.2, seed: int = 0):
    """Gaussian clusters around random centres: a small, learnable stand-in for backbone features."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 1.0
    y = np.repeat(np.arange(n_classes), per_class)
    x = centres[y] + spread * rng.normal(size=(len(y), dim))
    return x.astype(np.float32), y


# ----------------------------------------------------------------------------------------------- heads


def test_srl_head_identity_init_reproduces_backbone() -> None:
    x, _ = _clusters()
    emb = SRLHead(16).embed(x)
    np.testing.assert_allclose(emb, x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-6)


def test_pca_whitening_init() -> None:
    x, _ = _clusters(per_class=60)
    head = SRLHead(16, 6).init_pca_whitening(x)
    z = head.linear(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(6), atol=1e-3)
    with pytest.raises(ModelError, match="dim <="):
        pca_whitening(x[:4], 6)
    # N samples, centred, span N - 1 axes: dim = N is refused (its last axis would be noise times 1/sqrt(eps)).
    with pytest.raises(ModelError, match="from 6 samples to 6 dimensions; use dim <= 5"):
        pca_whitening(x[:6], 6)
    w, _ = pca_whitening(x[:6], 5)
    assert np.abs(w @ (x[6:] - x[:6].mean(0)).T).max() < 100


def test_hash_codes_pm1_and_packed() -> None:
    x, _ = _clusters()
    head = HashHead(16, 32)
    c = head.codes(x)
    assert c.dtype == np.int8 and c.shape == (len(x), 32)
    assert set(np.unique(c)) <= {-1, 1}
    packed = head.packed_codes(x)
    assert packed.dtype == np.uint8 and packed.shape == (len(x), 4)
    np.testing.assert_array_equal(np.unpackbits(packed, axis=1).astype(np.int8) * 2 - 1, c)


def test_hash_code_of_zero_is_plus_one() -> None:
    head = HashHead(4, 8)
    with torch.no_grad():
        head.hash.weight.zero_()
        head.hash.bias.zero_()
    np.testing.assert_array_equal(head.codes(np.ones((2, 4), np.float32)), np.ones((2, 8), np.int8))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-30, 1e-8, 1.0, 1e4]))
def test_inductive_code_equals_sign_of_linear(seed: int, scale: float) -> None:
    # sgn(W x + b) must equal sgn(tanh(W x + b)) bitwise, including near 0 and where tanh saturates.
    torch.manual_seed(seed)
    head = HashHead(8, 16)
    x = (np.random.default_rng(seed).normal(size=(20, 8)) * scale).astype(np.float32)
    with torch.no_grad():
        h = head.hash(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(head.codes(x), np.where(h >= 0, 1, -1).astype(np.int8))


def test_hash_head_rejects_bad_bits() -> None:
    with pytest.raises(ModelError, match="multiple of 8"):
        HashHead(16, 12)


@pytest.mark.parametrize(
    "head",
    [SRLHead(16), SRLHead(16, 8), HashHead(16, 16, 5), PlainHead(16, 8, 3), CombinedHead(16, None, 16, 4)],
    ids=lambda h: h.config()["name"],
)
def test_head_round_trip(head: torch.nn.Module) -> None:
    x, _ = _clusters()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = json.loads(json.dumps(head.config()))
    again = head_from_config(cfg, head.state_dict())
    assert type(again) is type(head) and again.config() == head.config()
    xt = torch.from_numpy(x)
    with torch.no_grad():
        a, b = head.eval()(xt), again(xt)
    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,), strict=True):
        assert torch.equal(u, v)


def test_registry_errors_list_names() -> None:
    assert get_head("srl") is SRLHead and set(HEADS) == {"srl", "hash", "plain", "combined"}
    with pytest.raises(ModelError, match="combined, hash, plain, srl"):
        get_head("nope")
    with pytest.raises(ModelError, match="no 'name'"):
        head_from_config({"in_dim": 3})
    with pytest.raises(ModelError, match="bad config"):
        head_from_config({"name": "srl", "dims": 3})
    with pytest.raises(ModelError, match="do not fit"):
        head_from_config({"name": "srl", "in_dim": 8}, SRLHead(16).state_dict())


def test_combined_from_heads() -> None:
    x, _ = _clusters()
    s, h = SRLHead(16), HashHead(16, 8, 5)
    c = CombinedHead.from_heads(s, h)
    np.testing.assert_array_equal(c.embed(x), s.embed(x))
    np.testing.assert_array_equal(c.codes(x), h.codes(x))
    np.testing.assert_array_equal(c.packed_codes(x), h.packed_codes(x))
    with pytest.raises(ModelError, match="same backbone"):
        CombinedHead.from_heads(SRLHead(8), h)


@pytest.mark.parametrize("retention", ["none", "angle", "gate"])
def test_fused_combined_head_holds_the_code_in_its_float_embedding(retention: str) -> None:
    x, y = _clusters(per_class=40)
    s, h = SRLHead(16), HashHead(16, 8, 5)
    torch.nn.init.normal_(h.hash.weight)  # a code that is not near zero everywhere
    if retention != "none":
        s.set_retention(x, 0.6, 5)
    if retention == "gate":
        s.set_gate(x, y, 0.1, 0.9, 0.5, 0.05)
    c = CombinedHead.from_heads(s, h, fuse=0.5)
    emb = c.embed(x)
    assert emb.shape == (len(x), c.embedding_dim) and c.embedding_dim == s.embedding_dim + 8
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # By hand: the trained part is [f, 0.5 u/|u|] normalised; the retained part and its angle are the SRL head's.
    f = s.embed_trained(x)
    u = h(torch.from_numpy(x)).detach().numpy()
    t = np.concatenate([f, 0.5 * u / np.linalg.norm(u, axis=1, keepdims=True)], axis=1)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    if retention == "none":
        np.testing.assert_allclose(emb, t, atol=1e-5)
    else:
        with torch.no_grad():
            a = s.angles(torch.from_numpy(f)).numpy()[:, None]
            r = s.retained(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(emb, np.concatenate([np.cos(a) * t, np.sin(a) * r], axis=1), atol=1e-5)
    # The encoder's path (forward) gives the same vectors; codes are the hash head's; the file round-trips.
    with torch.no_grad():
        fwd, _ = c.eval()(torch.from_numpy(x))
    np.testing.assert_allclose(fwd.numpy(), emb, atol=1e-6)
    np.testing.assert_array_equal(c.codes(x), h.codes(x))
    again = head_from_config(json.loads(json.dumps(c.config())), c.state_dict())
    assert again.config()["fuse"] == 0.5
    np.testing.assert_array_equal(again.embed(x), emb)
    # Unfused heads keep their config (and so their fingerprint) as before fusion existed.
    assert "fuse" not in CombinedHead.from_heads(s, h).config()
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ModelError, match="fuse"):
            CombinedHead(16, None, 8, 5, fuse=bad)


def test_train_srl_chooses_the_code_weight_with_the_gate_on_validation() -> None:
    x, y = _clusters(spread=1.6, per_class=40, n_classes=8)
    kw = {"epochs": 4, "lr": 3e-3, "warmup_epochs": 1, "val_fraction": 0.2, "seed": 1, "retain_dim": 8}
    lines: list[str] = []
    head, hist = train_srl(x, y, retain_gate=True, fuse_codes={"bits": 8, "epochs": 4}, log=lines.append, **kw)
    curve = hist["retain_val_mAP"]
    per_weight = len(RETAIN_ANGLES) + len(GATE_ANGLES_LO) * len(GATE_ANGLES_HI) * len(GATE_TAUS)
    assert len(curve) == len(FUSE_WEIGHTS) * per_weight
    assert {k.split(" ")[1] for k in curve} == {f"{w:g}" for w in FUSE_WEIGHTS}
    means = {k: (v["seen"] + v["unseen"]) / 2 for k, v in curve.items()}
    gate, fuse = hist["retain_gate"], hist["fuse"]
    assert fuse in FUSE_WEIGHTS and hist["config"]["fuse_codes"] is True
    assert head.gate == (None if gate is None else tuple(gate))
    key = f"code {fuse:g} " + (
        f"{hist['retain_angle']:.2f}" if gate is None else "gate " + " ".join(f"{v:.2f}" for v in gate[:3])
    )
    assert means[key] == max(means.values()) or (gate is None and hist["retain_angle"] == RETAIN_ANGLES[1])
    # The log (train -v) names the choice and its scores in one short line; the curve stays in the history.
    (said,) = [line for line in lines if line.startswith("srl retention")]
    seen, unseen = curve[key]["seen"], curve[key]["unseen"]
    assert f"val mAP {seen:.4f} on seen and {unseen:.4f} on held-out classes" in said and len(said) < 200, said
    assert f"chosen from {len(curve)} candidates" in said
    # Without it nothing changes: the same curve keys as before, weight 0.
    plain = train_srl(x, y, retain_gate=True, **kw)[1]
    assert plain["fuse"] == 0.0 and not any(k.startswith("code") for k in plain["retain_val_mAP"])
    assert plain["config"]["fuse_codes"] is False


def test_recipe_fuse_codes_builds_the_head_validation_chose() -> None:
    from geoir.training.recipes import Recipe

    x, y = _clusters(spread=1.6, per_class=40, n_classes=8)
    opts = {"srl": {"epochs": 3, "warmup_epochs": 1}, "dgssh": {"epochs": 3}}
    r = Recipe(bits=16, retain_dim=8, augment="none", fuse_codes=True, options=opts)
    head, hist = r.train(x, y, seed=1)
    assert isinstance(head, CombinedHead) and head.fuse == hist["srl"]["fuse"] in FUSE_WEIGHTS
    assert head.embedding_dim == 16 + 8 + (16 if head.fuse else 0) == head.embed(x[:3]).shape[1]
    assert Recipe.from_dict(r.to_dict()).fuse_codes and not Recipe.from_dict({"method": "combined"}).fuse_codes
    assert not Recipe().fuse_codes  # the shipped recipe does not fuse
    for bad in ({"method": "srl"}, {"retain_dim": 0}):
        with pytest.raises(DatasetError, match="--fuse-codes"):
            Recipe(fuse_codes=True, **bad)  # type: ignore[arg-type]


class _Bars:
    """A progress factory that records every bar: its label, unit, total, ticks, notes and whether it closed."""

    def __init__(self) -> None:
        self.bars: list[dict] = []

    def __call__(self, total: int, label: str, unit: str = "tile") -> _Bars:
        self.bars.append({"label": label, "unit": unit, "total": total, "ticks": 0, "notes": [], "closed": False})
        return self

    def update(self, n: int = 1) -> None:
        assert not self.bars[-1]["closed"], "a tick after the bar closed"
        self.bars[-1]["ticks"] += n

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.bars[-1]["notes"].append(s)

    def close(self) -> None:
        self.bars[-1]["closed"] = True


def test_recipe_training_shows_a_bar_over_every_training_loop() -> None:
    from geoir.training.fit import GATE_ANGLES_HI, GATE_ANGLES_LO, GATE_TAUS, RETAIN_ANGLES
    from geoir.training.recipes import Recipe

    x, y = _clusters(spread=1.6, per_class=40, n_classes=8)
    opts = {"srl": {"epochs": 3, "warmup_epochs": 1}, "dgssh": {"epochs": 4, "warmup_epochs": 1}}
    bars = _Bars()
    head, hist = Recipe(bits=16, retain_dim=8, augment="none", options=opts).train(x, y, seed=1, progress=bars)
    best = hist["dgssh"]["best_epoch"]
    candidates = len(RETAIN_ANGLES) + len(GATE_ANGLES_LO) * len(GATE_ANGLES_HI) * len(GATE_TAUS)
    # The shipped recipe's loops in the order they run: the SRL head, its retention probe, the scoring of
    # the retention candidates, the hash head and its refit for the epochs validation chose.
    assert [(b["label"], b["unit"], b["total"]) for b in bars.bars] == [
        ("SRL head", "epoch", 3),
        ("SRL head, retention probe", "epoch", 3),
        ("SRL retention choices", "candidate", candidates),
        ("DGSSH head (16 bits)", "epoch", 4),
        ("DGSSH head (16 bits), refit on all items", "epoch", best),
    ]
    assert all(b["closed"] and b["ticks"] == b["total"] for b in bars.bars)
    # Each epoch of a loop with validation shows its validation mAP; a refit has none to show.
    val = [f"val mAP {v:.3f}" for v in hist["dgssh"]["val_mAP_I1"]]
    assert bars.bars[3]["notes"] == val and bars.bars[4]["notes"] == []
    assert bars.bars[0]["notes"] == [f"val mAP {v:.3f}" for v in hist["srl"]["val_mAP"]]
    # The bars change nothing: the same recipe trained without them gives the same head.
    again, _ = Recipe(bits=16, retain_dim=8, augment="none", options=opts).train(x, y, seed=1)
    assert np.array_equal(head.embed(x), again.embed(x)) and np.array_equal(head.codes(x), again.codes(x))


def test_refit_and_plain_training_show_their_own_bars() -> None:
    from geoir.training.recipes import Recipe

    x, y = _clusters(spread=1.6, per_class=40, n_classes=8)
    opts = {"srl": {"epochs": 3, "warmup_epochs": 1}, "plain": {"epochs": 5, "warmup_epochs": 1}}
    bars = _Bars()
    _, hist = Recipe(method="srl", retain_dim=0, augment="none", refit="all", options=opts).train(x, y, progress=bars)
    assert [(b["label"], b["total"], b["ticks"]) for b in bars.bars] == [
        ("SRL head", 3, 3),
        ("SRL head, refit on all items", hist["srl"]["best_epoch"], hist["srl"]["best_epoch"]),
    ]
    bars = _Bars()
    Recipe(method="plain", bits=32, augment="none", refit="none", options=opts).train(x, y, progress=bars)
    assert [(b["label"], b["total"], b["ticks"], b["closed"]) for b in bars.bars] == [
        ("plain head (32 bits)", 5, 5, True)
    ]


def test_retention_appends_the_backbone_principal_axes() -> None:
    x, _ = _clusters(per_class=40)
    head = SRLHead(16, 8).init_pca_whitening(x)
    plain = head.embed(x)
    head.set_retention(x, 0.6, 5)
    emb = head.embed(x)
    assert emb.shape == (len(x), 13) and head.embedding_dim == 13
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[:, :8], np.cos(0.6) * plain, atol=1e-6)
    # The retained part: normalised features, centred on their mean, on the top principal axes, normalised.
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    zc = z - z.mean(0)
    r = zc @ np.linalg.svd(zc, full_matrices=False)[2][:5].T
    np.testing.assert_allclose(emb[:, 8:], np.sin(0.6) * r / np.linalg.norm(r, axis=1, keepdims=True), atol=1e-5)
    # Its ranking among the features equals the backbone's own in those axes (angle -> pi/2 leaves only it).
    head.set_retention(x, np.pi / 2, 5)
    np.testing.assert_allclose(head.embed(x)[:, 8:], r / np.linalg.norm(r, axis=1, keepdims=True), atol=1e-5)
    with pytest.raises(ModelError, match="angle"):
        head.set_retention(x, 0.0, 5)


@pytest.mark.parametrize("cls", ["srl", "combined"])
def test_retention_round_trips_and_old_heads_still_load(cls: str) -> None:
    x, _ = _clusters(per_class=40)
    head = SRLHead(16) if cls == "srl" else CombinedHead(16, None, 16, 5)
    old_cfg, old_state = head.config(), head.state_dict()
    (head if cls == "srl" else head.srl).set_retention(x, 0.5, 6)
    cfg = json.loads(json.dumps(head.config()))
    assert cfg["retain"] == 0.5 and cfg["retain_dim"] == 6 and head.embedding_dim == 22
    again = head_from_config(cfg, head.state_dict())
    xt = torch.from_numpy(x)
    with torch.no_grad():
        a, b = head.eval()(xt), again(xt)
    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,), strict=True):
        assert torch.equal(u, v)
    # A head saved before retention existed (no retain keys, no buffers) loads strictly, unchanged.
    old = head_from_config(old_cfg, old_state)
    assert "retain" not in old.config() and old.embedding_dim == 16


def test_retention_gate_weighs_each_item_by_its_nearest_class() -> None:
    x, y = _clusters(per_class=40, spread=0.3)
    head = SRLHead(16).set_retention(x, 0.7, 5)
    fixed = head.embed(x)
    with pytest.raises(ModelError, match="bad retention gate"):
        head.set_gate(x, y, 1.0, 0.5, 0.7, 0.05)
    with pytest.raises(ModelError, match="set_retention before set_gate"):
        SRLHead(16).set_gate(x, y, 0.1, 1.2, 0.7, 0.05)
    head.set_gate(x, y, 0.1, 1.2, 0.7, 0.05)
    assert head.retain == 1.2 and head.embedding_dim == 21
    # The confidence is the cosine to the nearest class centroid of the trained part (here the identity).
    f = x / np.linalg.norm(x, axis=1, keepdims=True)
    cent = np.stack([f[y == c].mean(0) for c in range(5)])
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    conf = (f @ cent.T).max(1)
    angles = 1.2 + (0.1 - 1.2) / (1 + np.exp(-(conf - 0.7) / 0.05))
    emb = head.embed(x)
    np.testing.assert_allclose(emb[:, :16], np.cos(angles)[:, None] * f, atol=1e-5)
    # The retained part is the fixed retention's, re-weighted per item.
    np.testing.assert_allclose(emb[:, 16:], np.sin(angles)[:, None] * fixed[:, 16:] / np.sin(0.7), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Tight training clusters sit near their centroids (angle near lo); a direction no class has, near hi.
    assert np.median(angles) < 0.2
    far = -np.ones((1, 16), np.float32) * np.sign(cent.sum(0))
    assert head.angles(torch.from_numpy(head.embed_trained(far)))[0] > 1.0
    # Saved and loaded (alone and inside a combined head) it embeds the same.
    cfg = json.loads(json.dumps(head.config()))
    assert cfg["gate"] == [0.1, 1.2, 0.7, 0.05] and cfg["gate_classes"] == 5
    np.testing.assert_array_equal(head_from_config(cfg, head.state_dict()).embed(x), emb)
    combined = CombinedHead.from_heads(head, HashHead(16, 8, 5))
    again = head_from_config(json.loads(json.dumps(combined.config())), combined.state_dict())
    np.testing.assert_array_equal(again.embed(x), emb)
    with pytest.raises(ModelError, match="retention gate"):
        SRLHead(16, gate=[0.1, 1.2, 0.7, 0.05], gate_classes=5)


def test_train_srl_chooses_a_gate_on_validation() -> None:
    x, y = _clusters(spread=1.6, per_class=40, n_classes=8)
    kw = {"epochs": 6, "lr": 3e-3, "warmup_epochs": 1, "val_fraction": 0.2, "seed": 1, "retain_dim": 8}
    head, hist = train_srl(x, y, retain_gate=True, **kw)
    curve = hist["retain_val_mAP"]
    assert len(curve) == len(RETAIN_ANGLES) + len(GATE_ANGLES_LO) * len(GATE_ANGLES_HI) * len(GATE_TAUS)
    means = {k: (v["seen"] + v["unseen"]) / 2 for k, v in curve.items()}
    best = max(means.values())
    gate = hist["retain_gate"]
    if gate is None:
        # A fixed angle won (it is one of the candidates).
        assert means[f"{hist['retain_angle']:.2f}"] == best or hist["retain_angle"] == RETAIN_ANGLES[1]
        assert head.gate is None
    else:
        assert means["gate " + " ".join(f"{v:.2f}" for v in gate[:3])] == best
        assert head.gate == tuple(gate) and head.retain == gate[1] == hist["retain_angle"]
        assert head.gate_centroids.shape == (8, 16)
    assert hist["config"]["retain_gate"] is True
    fixed = train_srl(x, y, retain_gate=True, retain_angle=0.3, **kw)[0]
    assert fixed.gate is None and fixed.retain == 0.3


def test_train_srl_sets_the_gate_validation_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    import geoir.training.fit as fit

    x, y = _clusters(spread=1.6, per_class=40, n_classes=8)
    kw = {"epochs": 3, "lr": 3e-3, "warmup_epochs": 1, "val_fraction": 0.2, "seed": 1, "retain_dim": 8}
    seen: dict[str, bool] = {}

    def choose(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen["gate"], seen["codes"] = args[-2], args[-1]
        return 0.9, (0.3, 0.9, 0.6, 0.05), {"gate 0.30 0.90 0.60": {"seen": 1.0, "unseen": 1.0}}, 0.0

    monkeypatch.setattr(fit, "_choose_retention", choose)
    head, hist = train_srl(x, y, retain_gate=True, **kw)
    assert seen["gate"] is True and hist["retain_gate"] == [0.3, 0.9, 0.6, 0.05] and hist["retain_angle"] == 0.9
    assert seen["codes"] is None and hist["fuse"] == 0.0
    assert head.gate == (0.3, 0.9, 0.6, 0.05) and head.retain == 0.9
    # Its centroids are the fitting images' classes in the trained embedding, the validation images left out.
    fit_idx, _ = fit._holdout(y, 0.2, "stratified", 1)
    f = head.embed_trained(x[fit_idx])
    cent = np.stack([f[y[fit_idx] == c].mean(0) for c in range(8)])
    np.testing.assert_allclose(
        head.gate_centroids.numpy(), cent / np.linalg.norm(cent, axis=1, keepdims=True), atol=1e-5
    )


def test_train_srl_chooses_retention_on_validation() -> None:
    x, y = _clusters(spread=1.6, per_class=40, n_classes=8)
    kw = {"epochs": 6, "lr": 3e-3, "warmup_epochs": 1, "val_fraction": 0.2, "seed": 1, "retain_dim": 8}
    head, hist = train_srl(x, y, **kw)
    curve = hist["retain_val_mAP"]
    assert [float(a) for a in curve] == list(RETAIN_ANGLES)
    assert all(0 < v["seen"] <= 1 and 0 < v["unseen"] <= 1 for v in curve.values())
    # The angle with the best mean of the probe's seen and held-out-class validation mAPs (never 0).
    means = {float(a): (v["seen"] + v["unseen"]) / 2 for a, v in curve.items()}
    best = max(means, key=lambda a: (means[a], -a))
    angle = hist["retain_angle"]
    assert angle == (best if best > 0 else RETAIN_ANGLES[1])
    assert head.retain == angle and head.embedding_dim == 16 + 8
    fixed, h2 = train_srl(x, y, **{**kw, "retain_angle": 0.3})
    assert fixed.retain == 0.3 and h2["retain_angle"] == 0.3 and h2["retain_val_mAP"] == {}
    off, h3 = train_srl(x, y, **{**kw, "retain_dim": 0})
    assert off.retain == 0 and "retain_angle" not in h3
    # Retention is added after training: the trained part is the head without it, scaled by cos(angle).
    np.testing.assert_allclose(head.embed(x)[:, :16], np.cos(angle) * off.embed(x), atol=1e-6)
    nv, h4 = train_srl(x, y, **{**kw, "val_fraction": 0.0})
    assert h4["retain_angle"] == RETAIN_DEFAULT_ANGLE == nv.retain
    # Two classes cannot spare one for the probe: the default angle, not an error. Neither can three: one
    # held-out class ranked among itself scores 1 at every angle, so the choice would rest on the seen
    # classes alone. Four hold two out and keep two.
    logged: list[str] = []
    for n in (2, 3):
        h5 = train_srl(x[y < n], y[y < n], log=logged.append, **kw)[1]
        assert h5["retain_angle"] == RETAIN_DEFAULT_ANGLE and h5["retain_val_mAP"] == {}
        assert f"the default ({n} classes are too few)" in logged[-1] and "(8 axes)" in logged[-1]
    h6 = train_srl(x[y < 4], y[y < 4], **kw)[1]
    assert len(h6["retain_val_mAP"]) == len(RETAIN_ANGLES)
    assert all(v["unseen"] < 1 for v in h6["retain_val_mAP"].values())


def test_recipe_records_retention_and_reads_old_records() -> None:
    from geoir.training.recipes import Recipe

    assert Recipe().retain_dim == 256 and Recipe.from_dict(Recipe(retain_dim=64).to_dict()).retain_dim == 64
    assert Recipe.from_dict({"method": "srl", "bits": 64, "dim": None, "epochs": 3, "seed": 0}).retain_dim == 0
    assert Recipe().retain_gate and not Recipe.from_dict({"method": "srl", "retain_dim": 64}).retain_gate
    # Distillation is on by default; recipes recorded before it existed trained without it.
    assert Recipe().distill == 10.0 and Recipe.from_dict({"method": "srl", "retain_dim": 64}).distill == 0.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(DatasetError, match="--distill"):
            Recipe(distill=bad)
    with pytest.raises(DatasetError, match="retain-dim"):
        Recipe(retain_dim=-1)
    with pytest.raises(DatasetError, match="--augment"):
        Recipe(augment="mirror")
    assert Recipe(method="srl", augment="dihedral-codes").views_needed == "none"
    assert Recipe(method="dgssh", augment="dihedral-codes").views_needed == "dihedral-codes"
    # What `geoir info` shows: the settings as they took effect on the method's heads.
    assert Recipe(method="srl", augment="dihedral-codes", retain_dim=0).applied() == {
        "method": "srl", "seed": 0, "retain_dim": 0, "augment": "none", "distill": 10.0, "refit": "none"
    }  # fmt: skip
    assert Recipe(method="dgssh", bits=32, epochs=7, refit="all").applied() == {
        "method": "dgssh", "bits": 32, "epochs": 7, "seed": 0, "augment": "dihedral", "refit": "codes"
    }  # fmt: skip
    assert Recipe(method="combined", refit="float").applied() == {
        "method": "combined", "bits": 64, "seed": 0, "retain_dim": 256, "retain_gate": True, "augment": "dihedral",
        "distill": 10.0, "fuse_codes": False, "refit": "float"
    }  # fmt: skip
    # The default is the shipped model's recipe: every head on the views.
    assert Recipe(method="srl").views_needed == "dihedral" and Recipe().augment == "dihedral"
    # The default re-trains the hash head only; recipes recorded before refitting existed trained without it,
    # and those recorded when it was one switch for every head read as "all" / "none".
    assert Recipe().refit == "codes" and Recipe.from_dict({"method": "srl"}).refit == "none"
    assert Recipe.from_dict({**Recipe().to_dict(), "refit": True}).refit == "all"
    assert Recipe.from_dict({**Recipe().to_dict(), "refit": False}).refit == "none"
    assert Recipe.from_dict(Recipe(refit="float").to_dict()).refit == "float"
    for bad in ("both", True):  # a switch is read as heads only from a record (from_dict)
        with pytest.raises(DatasetError, match="--refit"):
            Recipe(refit=bad)  # type: ignore[arg-type]


def test_recipe_head_options_add_the_recipe_epochs_without_touching_the_options() -> None:
    from geoir.training.recipes import Recipe

    r = Recipe(epochs=5, options={"dgssh": {"lr": 2e-3, "epochs": 50}})
    assert r.head_options("dgssh") == {"lr": 2e-3, "epochs": 5}  # the recipe's --epochs wins
    assert r.head_options("srl") == {"epochs": 5}
    assert r.options == {"dgssh": {"lr": 2e-3, "epochs": 50}}
    assert Recipe(options={"dgssh": {"lr": 2e-3}}).head_options("dgssh") == {"lr": 2e-3}


@pytest.mark.parametrize(
    ("augment", "float_views", "code_views"), [("dihedral-codes", 0, 7), ("dihedral", 7, 7), ("none", 0, 0)]
)
def test_recipe_gives_views_to_the_heads_its_augment_names(augment: str, float_views: int, code_views: int) -> None:
    from geoir.training.recipes import Recipe

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 10)
    x = (rng.normal(size=(4, 16))[y] + 0.3 * rng.normal(size=(40, 16))).astype(np.float32)
    views = (x[None] + 0.05 * rng.normal(size=(7, 40, 16))).astype(np.float32)
    _, hist = Recipe(method="combined", bits=16, epochs=1, retain_dim=0, augment=augment).train(x, y, views=views)
    assert hist["srl"]["config"]["views"] == float_views
    assert hist["dgssh"]["config"]["views"] == code_views


# ----------------------------------------------------------------------------------------------- sampling


def test_balanced_chunks_visit_each_index_once() -> None:
    y = np.array([0] * 10 + [1] * 7 + [2] * 3)
    rounds = balanced_chunks(y, 4, np.random.default_rng(0))
    flat = np.concatenate([np.concatenate(r) for r in rounds])
    assert sorted(flat.tolist()) == list(range(20))
    for r in rounds:
        assert len({int(y[g[0]]) for g in r}) == len(r)  # one chunk per class per round
        assert all(len(set(y[g].tolist())) == 1 for g in r)


def test_dgssh_batches_cover_epoch_and_have_positives() -> None:
    y = np.repeat(np.arange(21), 72)
    batches = dgssh_batches(y, np.random.default_rng(0))
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(y)))
    assert max(len(b) for b in batches) == 32
    # Every batch item has an in-batch positive (chunks of 4), so no anchor is dropped.
    for b in batches:
        _, counts = np.unique(y[b], return_counts=True)
        assert counts.min() >= 2


def test_stratified_holdout() -> None:
    y = np.repeat(np.arange(3), [10, 20, 2])
    keep, hold = stratified_holdout(y, 0.1, seed=0)
    assert np.intersect1d(keep, hold).size == 0 and len(keep) + len(hold) == 32
    assert np.bincount(y[hold], minlength=3).tolist() == [1, 2, 0]


def test_class_holdout() -> None:
    y = np.repeat(np.arange(10), 5)
    keep, hold = class_holdout(y, 0.2, seed=0)
    assert len(np.unique(y[hold])) == 2 and np.intersect1d(np.unique(y[keep]), np.unique(y[hold])).size == 0
    assert len(keep) + len(hold) == 50
    # Always two held out (one alone ranks at mAP 1 among itself) and two kept.
    keep, hold = class_holdout(np.repeat(np.arange(4), 3), 0.1, seed=0)
    assert len(np.unique(hold // 3)) == 2 and len(keep) == 6
    for classes in (2, 3):
        with pytest.raises(DatasetError, match="at least 4 classes"):
            class_holdout(np.repeat(np.arange(classes), 2), 0.5, 0)


def test_warmup_cosine() -> None:
    f = warmup_cosine(100, 10, 0.01)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(100) == pytest.approx(0.01) and f(55) == pytest.approx(0.505)


# ----------------------------------------------------------------------------------------------- training


def test_train_srl_improves_and_is_deterministic() -> None:
    x, y = _clusters(spread=1.6)
    kw = {"epochs": 8, "lr": 3e-3, "warmup_epochs": 1, "val_fraction": 0.2, "seed": 3}
    head, hist = train_srl(x, y, **kw)
    assert hist["best_val_mAP"] >= hist["val_mAP_initial"]
    assert hist["loss"][-1] < hist["loss"][0]
    assert isinstance(head, SRLHead) and not head.training
    json.dumps(hist)
    head2, _ = train_srl(x, y, **kw)
    np.testing.assert_array_equal(head.embed(x), head2.embed(x))


def _gram_gap(e: np.ndarray, t: np.ndarray) -> float:
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    return float(np.mean((e @ e.T - t @ t.T) ** 2))


@pytest.mark.parametrize("mode", ["pool", "pk"])
def test_train_srl_distill_keeps_the_backbone_geometry_of_untaught_classes(mode: str) -> None:
    x, y = _clusters(n_classes=6, spread=1.6, dim=12)
    taught = y < 4
    kw = {"epochs": 10, "lr": 1e-2, "warmup_epochs": 1, "val_fraction": 0.0, "seed": 1, "mode": mode}
    kw.update(classes_per_batch=2, per_class=6)
    plain, h0 = train_srl(x[taught], y[taught], **kw)
    kept, h1 = train_srl(x[taught], y[taught], distill=20.0, distill_sample=16, **kw)
    assert h0["config"]["distill"] == 0.0 and h1["config"]["distill"] == 20.0
    # The teacher is the untrained head: the centred features of the training images.
    new = x[~taught] - x[taught].mean(0)
    assert _gram_gap(kept.embed(x[~taught]), new) < 0.5 * _gram_gap(plain.embed(x[~taught]), new)
    # Off, it draws nothing from the random stream: the same head as a run that never heard of it.
    again, _ = train_srl(x[taught], y[taught], distill=0.0, **kw)
    np.testing.assert_array_equal(again.embed(x), plain.embed(x))


@pytest.mark.parametrize(
    "bad", [{"distill": -1.0}, {"distill": float("nan")}, {"distill": float("inf")}, {"distill_sample": 1}]
)
def test_train_srl_rejects_bad_distill(bad: dict) -> None:
    x, y = _clusters()
    with pytest.raises(DatasetError, match="distill"):
        train_srl(x, y, epochs=1, **bad)


def test_train_srl_pk_mode_and_small_dim() -> None:
    x, y = _clusters(spread=1.6)
    head, hist = train_srl(
        x,
        y,
        dim=8,
        mode="pk",
        classes_per_batch=3,
        per_class=4,
        epochs=3,
        lr=3e-3,
        warmup_epochs=1,
        loss=SRLLoss(k_p=5, k_n=5),
    )
    assert head.out_dim == 8 and len(hist["loss"]) == 3 and np.isfinite(hist["loss"]).all()
    assert hist["config"]["k_p"] == 5


def test_train_srl_patience_stops_early() -> None:
    x, y = _clusters(spread=0.1)  # already perfect: no improvement possible
    _, hist = train_srl(x, y, epochs=20, patience=2, lr=1e-4)
    assert len(hist["loss"]) == 2 and hist["best_epoch"] == 0


@pytest.mark.parametrize("variant", ["A", "B"])
def test_train_dgssh(variant: str) -> None:
    x, y = _clusters(spread=1.2)
    head, hist = train_dgssh(x, y, bits=16, variant=variant, epochs=6, warmup_epochs=1, seed=1)  # type: ignore[arg-type]
    V = hist["V"]
    assert V.dtype == np.int8 and set(np.unique(V)) <= {-1, 1}
    assert V.shape == (len(hist["fit_index"]), 16)
    assert 0 <= hist["bit_agreement"][-1] <= 1
    assert hist["best_val_mAP"] > 0.5
    json.dumps({k: v for k, v in hist.items() if k != "V"})  # everything but V is JSON-able
    codes = head.codes(x)
    out = evaluate_retrieval(codes, codes, y, y, metric="hamming", self_index=np.arange(len(y)))
    assert out["mAP"] > 0.5


@pytest.mark.parametrize("bits", BITS)
def test_train_dgssh_every_code_length(bits: int) -> None:
    # The issue's code lengths: each trains, encodes new items by the network, packs to bits / 8 bytes and
    # survives a save/load of its head.
    x, y = _clusters(n_classes=4, per_class=16, spread=0.8)
    head, hist = train_dgssh(x, y, bits=bits, epochs=2, warmup_epochs=1, seed=0)
    assert hist["V"].shape == (len(hist["fit_index"]), bits)
    codes = head.codes(x)
    assert codes.shape == (len(x), bits) and set(np.unique(codes)) <= {-1, 1}
    assert head.packed_codes(x).shape == (len(x), bits // 8)
    again = head_from_config(head.config(), head.state_dict())
    np.testing.assert_array_equal(again.codes(x), codes)


def test_train_dgssh_beats_chance_by_far_and_matches_v() -> None:
    x, y = _clusters(n_classes=6, per_class=40, spread=1.0)
    _, hist = train_dgssh(x, y, bits=16, epochs=15, warmup_epochs=2, rho=0.1, seed=0)
    assert hist["best_val_mAP"] > 0.8
    assert hist["bit_agreement"][hist["best_epoch"] - 1] > 0.8
    hist_t = train_dgssh(x, y, bits=16, epochs=3, warmup_epochs=1, select_on="T", recompute_u=False)[1]
    assert len(hist_t["val_mAP_T"]) == 3


def test_train_plain() -> None:
    x, y = _clusters()
    head, hist = train_plain(x, y, bits=8, epochs=20, batch_size=32)
    assert isinstance(head, PlainHead) and hist["best_val_mAP"] > 0.5
    assert head_from_config(head.config(), head.state_dict()).config()["name"] == "plain"


@pytest.mark.parametrize("method", ["srl", "srl-pk", "dgssh", "plain"])
def test_training_with_views_and_class_validation(method: str) -> None:
    x, y = _clusters(n_classes=6, spread=1.0)
    rng = np.random.default_rng(5)
    views = np.stack([x + 0.05 * rng.normal(size=x.shape), x[:, ::-1].copy()]).astype(np.float32)
    kw = {"views": views, "val_split": "classes", "val_fraction": 0.34, "epochs": 3, "warmup_epochs": 1}
    if method.startswith("srl"):
        _, hist = train_srl(x, y, mode="pk" if method == "srl-pk" else "pool", lr=3e-3, **kw)
    elif method == "dgssh":
        _, hist = train_dgssh(x, y, bits=8, **kw)
    else:
        _, hist = train_plain(x, y, bits=8, **kw)
    assert hist["config"]["views"] == 2 and hist["config"]["val_split"] == "classes"
    assert np.isfinite(hist["loss"]).all() and hist["best_val_mAP"] > 0
    with pytest.raises(DatasetError, match="V x N x D"):
        train_plain(x, y, views=views[:, :5], epochs=1)


def test_training_without_a_validation_image_keeps_the_last_epoch() -> None:
    """5 images per class hold out round(0.5) = 0 for validation: no selection, the last epoch is kept."""
    from geoir.training import fit

    x, y = _clusters(n_classes=3, per_class=5)
    fit_idx, val_idx = fit._holdout(y, 0.1, "stratified", 0)
    assert val_idx is None and len(fit_idx) == len(y)
    head, hist = train_srl(x, y, epochs=2, retain_dim=4, retain_gate=True)
    assert hist["best_epoch"] == 2 and hist["best_val_mAP"] is None
    assert hist["retain_angle"] == RETAIN_DEFAULT_ANGLE and head.retain == RETAIN_DEFAULT_ANGLE
    for train in (train_dgssh, train_plain):
        _, hist = train(x, y, bits=8, epochs=2)
        assert hist["best_epoch"] == 2 and hist["best_val_mAP"] is None
    # 20 classes of 5: the validation split is empty, and so is the retention probe's: the default angle.
    x, y = _clusters(n_classes=20, per_class=5)
    _, hist = train_srl(x, y, epochs=1, retain_dim=4)
    assert hist["best_val_mAP"] is None and hist["retain_angle"] == RETAIN_DEFAULT_ANGLE


@pytest.mark.parametrize("train", [train_srl, train_dgssh, train_plain])
def test_stop_after_follows_the_same_schedule_and_stops(train) -> None:  # type: ignore[no-untyped-def]
    x, y = _clusters()
    kw = {"epochs": 6, "warmup_epochs": 1, "val_fraction": 0.0, "seed": 3}
    kw.update({} if train is train_srl else {"bits": 8})
    full = train(x, y, **kw)[1]
    cut = train(x, y, stop_after=2, **kw)[1]
    # The first two epochs of the six-epoch schedule, step for step, then nothing more.
    assert cut["loss"] == full["loss"][:2] and cut["best_epoch"] == 2
    if train is train_srl:
        h0, hist0 = train_srl(x, y, stop_after=0, **kw)
        assert hist0["loss"] == [] and hist0["best_epoch"] == 0
        assert np.allclose(h0.linear.weight.detach().numpy(), np.eye(x.shape[1]))  # the untrained head


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("train", [train_dgssh, train_plain])
def test_refit_trains_again_on_every_item_for_the_chosen_epochs(train) -> None:  # type: ignore[no-untyped-def]
    x, y = _clusters(n_classes=5, per_class=20, spread=1.4)
    kw = {"bits": 8, "epochs": 8, "warmup_epochs": 1, "val_fraction": 0.2, "seed": 2}
    first, hist = train(x, y, **kw)
    head, refit = train(x, y, refit=True, **kw)
    e = hist["best_epoch"]
    assert refit["best_epoch"] == e and refit["best_val_mAP"] == hist["best_val_mAP"]  # validation's choice
    assert refit["refit"]["epochs"] == e and refit["refit"]["items"] == len(y) and refit["config"]["refit"] is True
    again = train(x, y, **{**kw, "val_fraction": 0.0, "stop_after": e})[0]
    assert _same_weights(head, again) and not _same_weights(head, first)
    if train is train_dgssh:
        # The database codes and their rows are the refit's: every item.
        assert refit["fit_index"] == list(range(len(y))) and refit["V"].shape == (len(y), 8)
    # Without validation there is nothing to refit after: the same head, no record.
    none = train(x, y, **{**kw, "val_fraction": 0.0})
    assert _same_weights(none[0], train(x, y, **{**kw, "val_fraction": 0.0, "refit": True})[0])
    assert "refit" not in none[1]


def test_srl_refit_keeps_the_retention_validation_chose_fitted_on_every_item(monkeypatch: pytest.MonkeyPatch) -> None:
    import geoir.training.fit as fit

    x, y = _clusters(spread=1.6, per_class=40, n_classes=8)
    kw = {"epochs": 5, "lr": 3e-3, "warmup_epochs": 1, "val_fraction": 0.2, "seed": 1, "retain_dim": 8}
    calls: list[int] = []

    def choose(x_, y_, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(y_))  # the probe's choice is made on all items, as without refitting
        return 0.9, (0.3, 0.9, 0.6, 0.05), {}, 0.0

    monkeypatch.setattr(fit, "_choose_retention", choose)
    _, hist = train_srl(x, y, retain_gate=True, **kw)
    head, refit = train_srl(x, y, retain_gate=True, refit=True, **kw)
    assert calls == [len(y), len(y)]  # once per call: the refit head itself chooses nothing
    assert refit["best_epoch"] == hist["best_epoch"] and refit["refit"]["items"] == len(y)
    assert refit["retain_gate"] == [0.3, 0.9, 0.6, 0.05] and head.gate == (0.3, 0.9, 0.6, 0.05) and head.retain == 0.9
    trained = train_srl(x, y, **{**kw, "retain_dim": 0, "val_fraction": 0.0, "stop_after": hist["best_epoch"]})[0]
    assert torch.equal(head.linear.weight, trained.linear.weight)
    # The retained axes and the gate's class centroids come from every item, not the fitting 80 %.
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(head.retain_mean.numpy(), unit.mean(0), atol=1e-6)
    f = head.embed_trained(x)
    cent = np.stack([f[y == c].mean(0) for c in range(8)])
    np.testing.assert_allclose(
        head.gate_centroids.numpy(), cent / np.linalg.norm(cent, axis=1, keepdims=True), atol=1e-5
    )


def test_selector_keeps_a_state_whatever_the_scores() -> None:
    from geoir.training import fit

    head = torch.nn.Linear(2, 2)
    sel = fit._Selector()
    assert sel.update(float("nan"), 1, head) and sel.epoch == 1 and sel.state is not None
    assert not sel.update(float("nan"), 2, head) and sel.epoch == 1
    assert sel.update(0.5, 3, head) and sel.best == 0.5
    assert not sel.update(0.4, 4, head) and not sel.update(float("nan"), 5, head) and sel.epoch == 3
    assert sel.update(None, 6, head) and sel.epoch == 6


def test_training_input_errors() -> None:
    x, y = _clusters()
    with pytest.raises(DatasetError, match="N x D"):
        train_plain(x, y[:-1])
    with pytest.raises(DatasetError, match="at least 2"):
        train_srl(x[:3], np.array([0, 1, 2]))
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(DatasetError, match="NaN"):
        train_dgssh(bad, y)


# ----------------------------------------------------------------------------------------------- protocols


def test_stratified_split() -> None:
    y = np.repeat(np.arange(21), 100)
    s = stratified_split(y, 0.8, seed=0)
    assert len(s.train) == 1680 and len(s.test) == 420
    assert np.bincount(y[s.test]).tolist() == [20] * 21
    assert np.intersect1d(s.train, s.test).size == 0
    assert np.array_equal(stratified_split(y, 0.8, 0).test, s.test)
    assert not np.array_equal(stratified_split(y, 0.8, 1).test, s.test)
    paths = [f"img{i}.jpg" for i in range(len(y))]
    d = json.loads(s.to_json(paths))
    assert d["test_paths"][0] == paths[s.test[0]]
    back = Split.from_json(s.to_json())
    assert np.array_equal(back.train, s.train) and back.seed == 0
    with pytest.raises(DatasetError, match="at least 2") as err:
        stratified_split(np.array([0, 0, 1]))
    assert "class 1 has 1 image" in str(err.value)  # the label as given, not np.int64(1)
    with pytest.raises(DatasetError, match="class 'b' has 1 image"):
        stratified_split(np.array(["a", "a", "b"]))


def test_min_class_size() -> None:
    assert [min_class_size(f) for f in (0.8, 0.5, 0.2, 0.1)] == [3, 3, 8, 15]
    for f in (0.8, 0.5, 0.2, 0.1):
        n = min_class_size(f)
        assert split_train_size(n, f) >= 2 and split_train_size(n - 1, f) < 2
    assert min_class_size(0.8, 6) == 7


def test_run_protocols_checks_every_protocol_before_any_work(tmp_path: Path) -> None:
    import types

    from geoir.training.data import FeatureSet
    from geoir.training.evaluation import check_protocols, run_protocols

    x, y = _clusters(n_classes=3, per_class=6)
    data = FeatureSet(x, y, ["a", "b", "c"], [f"{i}.png" for i in range(len(y))], "fp")
    model = types.SimpleNamespace(meta={"recipe": {"method": "srl", "epochs": 1}, "name": "t"})
    logged: list[str] = []
    with pytest.raises(DatasetError, match=r"3 classes.*at least 17.*--protocol seen$"):
        run_protocols(model, data, ["seen", "unseen"], [0], [0], splits_dir=tmp_path / "s", log=logged.append)
    assert logged == [] and not (tmp_path / "s").exists()  # the seen protocol never ran
    with pytest.raises(DatasetError, match=r"at least 3 images per class; too few in 'b' \(2\)"):
        check_protocols(np.array([0, 0, 0, 1, 1]), ["a", "b"], ["seen"], source="ds")
    check_protocols(np.array([0, 0, 0, 1, 1, 1]), ["a", "b"], ["seen", "reference"])
    # SRL's P1 ranks the test images of a class against each other: 7 images leave 1 in test, 8 leave 2.
    with pytest.raises(
        DatasetError, match=r"test protocol.*at least 2 of them; too few in 'a' \(7\);.*--protocol test"
    ):
        check_protocols(np.repeat([0, 1], [7, 8]), ["a", "b"], ["seen", "test"], source="ds")
    check_protocols(np.repeat([0, 1], [8, 8]), ["a", "b"], ["seen", "test"])


def test_unseen_class_split() -> None:
    y = np.repeat(np.arange(21), 10)
    s = unseen_class_split(y, 15, seed=2)
    assert len(np.unique(y[s.train])) == 15 and len(np.unique(y[s.test])) == 6
    assert np.intersect1d(np.unique(y[s.train]), np.unique(y[s.test])).size == 0
    with pytest.raises(DatasetError, match="lower n_train_classes"):
        unseen_class_split(y, 20)


def test_unseen_class_split_is_the_published_draw() -> None:
    # UC Merced's 21 classes, seeds 0-2: the held-out classes behind the backbone's 0.868 (docs/results.md).
    # A different draw (e.g. rng.choice) gives other classes and a backbone mAP of 0.76 instead.
    y = np.repeat(np.arange(21), 3)
    held_out = [sorted(np.unique(y[unseen_class_split(y, 15, seed).test]).tolist()) for seed in range(3)]
    assert held_out == [[1, 5, 9, 14, 15, 20], [0, 6, 9, 13, 14, 19], [1, 3, 4, 5, 8, 9]]


def test_run_protocols_unseen_publishes_its_splits(tmp_path: Path) -> None:
    """The unseen-classes protocol on 17 classes: scores for the backbone and the head, and split lists."""
    import types

    from geoir.training.data import FeatureSet
    from geoir.training.evaluation import run_protocols
    from geoir.training.recipes import Recipe

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(17), 6)
    x = (rng.normal(size=(17, 16))[y] + 0.1 * rng.normal(size=(len(y), 16))).astype(np.float32)
    recipe = Recipe.from_dict({"method": "srl", "epochs": 2, "retain_dim": 0})
    head, _ = recipe.train(x, y, seed=0)
    model = types.SimpleNamespace(meta={"recipe": recipe.to_dict(), "name": "t"}, head=head)
    items = [f"c{c}/{i}.png" for i, c in enumerate(y)]
    data = FeatureSet(x, y, [f"c{i}" for i in range(17)], items, "fp")
    report = run_protocols(model, data, ["unseen"], [], [0, 1], splits_dir=tmp_path, log=lambda s: None)
    unseen = report["protocols"]["unseen"]
    assert set(unseen) == {"backbone float", "srl float"}
    assert all(len(v["runs"]) == 2 and 0 < v["mAP_mean"] <= 1 for v in unseen.values())
    for seed in (0, 1):
        split = json.loads((tmp_path / f"unseen_seed{seed}.json").read_text())
        assert split["test"] == unseen_class_split(y, 15, seed).test.tolist()
        assert {p.split("/")[0] for p in split["test_paths"]}.isdisjoint(p.split("/")[0] for p in split["train_paths"])
        assert unseen["backbone float"]["runs"][seed]["unseen_classes"] == sorted(set(y[split["test"]].tolist()))
        # The report says what each split's re-trained head chose: the history of training on that split.
        _, hist = recipe.train(x[split["train"]], y[split["train"]], seed=seed)
        chose = report["training"][f"unseen_seed{seed}"]["srl"]
        assert (chose["best_epoch"], chose["best_val_mAP"]) == (hist["srl"]["best_epoch"], hist["srl"]["best_val_mAP"])
    assert set(report["training"]) == {"unseen_seed0", "unseen_seed1"}


def test_evaluate_seen_protocols() -> None:
    x, y = _clusters(spread=0.05)
    s = stratified_split(y, 0.8, 0)

    def identity(f: np.ndarray) -> np.ndarray:
        return f

    for db in ("train", "all", "test"):
        out = evaluate_seen(identity, x, y, s, database=db, ks=(5,))
        assert out["mAP"] == pytest.approx(1.0) and db in out["protocol"]
    assert evaluate_seen(identity, x, y, s, database="all")["n_database"] == len(y) - 1
    # Protocol T: a supplied training database (here the exact codes of a hash head).
    head = HashHead(16, 16)
    codes = evaluate_seen(head.codes, x, y, s, metric="hamming", database_codes=head.codes(x[s.train]))
    assert codes["mAP"] == evaluate_seen(head.codes, x, y, s, metric="hamming")["mAP"]
    with pytest.raises(DatasetError, match="rows"):
        evaluate_seen(identity, x, y, s, database_codes=x[:3])


def test_evaluate_unseen_and_summarize() -> None:
    x, y = _clusters(n_classes=8, spread=0.05)
    out = evaluate_unseen(lambda f, yy, seed: lambda g: g, x, y, n_train_classes=5, seeds=(0, 1))
    assert len(out["runs"]) == 2 and len(out["runs"][0]["unseen_classes"]) == 3
    assert out["mAP_mean"] == pytest.approx(1.0) and out["mAP_std"] == pytest.approx(0.0)
    json.dumps(out)
    assert summarize([{"a": 1.0, "b": "x"}, {"a": 3.0, "b": "y"}]) == {"a_mean": 2.0, "a_std": 1.0}


# ----------------------------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.skipif(not UCMERCED.exists(), reason=f"UC Merced not found at {UCMERCED} (../shared/data is absent)")
def test_ucmerced_backbone_baseline_and_heads() -> None:
    """Backbone-only test-vs-train mAP is about 0.585 on the seed-0 split and a short DGSSH run beats it."""
    import csv

    from PIL import Image

    backbone_mod = pytest.importorskip("geoir.encoding.backbone")
    backbone = backbone_mod.load_backbone()
    with open(UCMERCED / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    classes = sorted({r["label"] for r in rows})
    y = np.array([classes.index(r["label"]) for r in rows])
    feats = []
    for s in range(0, len(rows), 64):
        imgs = [
            np.asarray(Image.open(UCMERCED / r["path"]).convert("RGB").resize((256, 256))) for r in rows[s : s + 64]
        ]
        feats.append(backbone.features(torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()).numpy())
    x = np.concatenate(feats)
    split = stratified_split(y, 0.8, seed=0)
    base = evaluate_seen(lambda f: f, x, y, split)["mAP"]
    assert 0.55 < base < 0.62
    head, _ = train_dgssh(x[split.train], y[split.train], bits=64, epochs=10)
    hashed = evaluate_seen(head.codes, x, y, split, metric="hamming")["mAP"]
    assert hashed > 0.9
