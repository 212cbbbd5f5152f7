"""FLatten-PVT, FLatten-PVTv2 and InLine-PVT: official parameter counts, official checkpoints, timm API.

The official weights cannot be downloaded here, so each checkpoint test writes random weights in the
official key layout (tests/official_reference_pvt.py), loads them with
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))`` and compares with
an independent functional forward of the official model. Reduced widths/depths and 64-px images
keep it cheap; every module type of the full models is exercised.
"""
from types import SimpleNamespace

import pytest
import timm
import torch
from timm.data import create_transform, resolve_data_config
from timm.optim import create_optimizer_v2

import linvision  # noqa: F401  (registers the models)
from linvision.backbones import linear_pvt_v2, pvt
from linvision.backbones._builder import unwrap_checkpoint
from official_reference_pvt import official_forward, official_key_count, official_state_dict

# Exact counts of the official classes (12.15M ... 51.154M), official state-dict key counts.
EXACT = {
    "flatten_pvt_t": (12_150_504, 168), "flatten_pvt_s": (21_670_248, 312),
    "flatten_pvt_m": (37_242_216, 528), "flatten_pvt_b": (50_649_192, 762),
    "flatten_pvt_v2_b0": (3_594_824, 186), "flatten_pvt_v2_b1": (12_931_240, 186),
    "flatten_pvt_v2_b2": (22_548_264, 346), "flatten_pvt_v2_b3": (38_273_832, 586),
    "flatten_pvt_v2_b4": (51_836_968, 846),
    "inline_pvt_t": (12_032_232, 166), "inline_pvt_s": (21_556_136, 310),
    "inline_pvt_m": (37_618_856, 526), "inline_pvt_l": (51_154_280, 760),
}
SPEC_MILLIONS = {  # the official counts as usually quoted (rounded)
    "flatten_pvt_t": "12.15", "flatten_pvt_s": "21.67", "flatten_pvt_m": "37.24", "flatten_pvt_b": "50.65",
    "flatten_pvt_v2_b0": "3.59", "flatten_pvt_v2_b1": "12.93", "flatten_pvt_v2_b2": "22.55",
    "flatten_pvt_v2_b3": "38.27", "flatten_pvt_v2_b4": "51.84",
    "inline_pvt_t": "12.032", "inline_pvt_s": "21.556", "inline_pvt_m": "37.619", "inline_pvt_l": "51.154",
}

# Reduced configurations (same classes, kwargs): name → (family, model kwargs). Two blocks in one stage
# exercise the block index; head dims 8/16 keep the focused and injective paths non-trivial.
SMALL = {
    "flatten_pvt_t": ("flatten_pvt", dict(embed_dims=(16, 32, 48, 64), depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4),
                                          mlp_ratios=(4, 4, 2, 2))),
    "flatten_pvt_v2_b0": ("flatten_pvt_v2", dict(embed_dims=(16, 32, 48, 64), depths=(1, 2, 1, 1),
                                                 num_heads=(1, 2, 3, 4), mlp_ratios=(4, 4, 2, 2))),
    "inline_pvt_t": ("inline_pvt", dict(embed_dims=(16, 32, 48, 64), depths=(1, 2, 1, 1), num_heads=(2, 2, 3, 4),
                                        mlp_ratios=(4, 4, 2, 2))),
}
IMG = 64
FILTERS = {"flatten_pvt": pvt.checkpoint_filter_fn, "inline_pvt": pvt.checkpoint_filter_fn,
           "flatten_pvt_v2": linear_pvt_v2.checkpoint_filter_fn}


def _small_sd(name, seed=0):
    family, kw = SMALL[name]
    return official_state_dict(family, img_size=IMG, seed=seed, **kw)


def _small_model(name, path=None, **extra):
    _, kw = SMALL[name]
    kwargs = {**kw, "img_size": IMG, **extra}
    if path is None:
        return timm.create_model(name, **kwargs)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", list(EXACT))
def test_exact_official_parameter_count(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == EXACT[name][0]
    digits = len(SPEC_MILLIONS[name].split(".")[1])
    assert f"{n / 1e6:.{digits}f}" == SPEC_MILLIONS[name]
    # One key per official key (no buffers), so the official state dict maps one to one.
    assert len(model.state_dict()) == EXACT[name][1]
    family = "flatten_pvt_v2" if "_v2_" in name else name.rsplit("_", 1)[0]
    assert official_key_count(family, model_depths(model)) == EXACT[name][1]


def model_depths(model):
    return [len(s.blocks) for s in model.stages]


@pytest.mark.parametrize("name", list(SMALL))
def test_official_checkpoint_reproduces_official_forward(tmp_path, name):
    family, kw = SMALL[name]
    sd = _small_sd(name)
    assert len(sd) == official_key_count(family, kw["depths"])
    path = tmp_path / f"{name}.pth"
    torch.save({"model": sd, "epoch": 299, "max_accuracy": 77.8}, path)
    model = _small_model(name, path).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ours = model(x)
        ref = official_forward(family, sd, x, kw["num_heads"])
    assert ref.abs().mean() > 0.1  # the random weights give non-trivial logits
    assert _rel_err(ours, ref) <= 1e-4


@pytest.mark.parametrize("name", list(SMALL))
def test_non_square_input_resizes_the_tables(tmp_path, name):
    """At another, non-square size: pos_embed resized bilinearly, the attention table bicubically."""
    family, kw = SMALL[name]
    sd = _small_sd(name, seed=3)
    model = _small_model(name).eval()
    model.load_state_dict(FILTERS[family](sd, model))
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        ours = model(x)
        ref = official_forward(family, sd, x, kw["num_heads"])
    assert _rel_err(ours, ref) <= 1e-4


def test_filter_unwraps_in_memory_containers():
    name = "flatten_pvt_t"
    family, kw = SMALL[name]
    raw, ema = _small_sd(name, seed=1), _small_sd(name, seed=2)
    container = {"model": raw, "state_dict_ema": ema, "optimizer": {"state": {}}, "lr_scheduler": None,
                 "epoch": 299, "max_accuracy": 77.758, "config": object()}
    model = _small_model(name)
    model.load_state_dict(pvt.checkpoint_filter_fn(container, model))      # 'model' by default
    torch.testing.assert_close(model.stages[1].blocks[1].attn.mixer.scale, raw["block2.1.attn.scale"])
    torch.testing.assert_close(model.unused_norm.weight, raw["norm.weight"])
    model.load_state_dict(pvt.checkpoint_filter_fn(unwrap_checkpoint(container, prefer_ema=True), model))
    torch.testing.assert_close(model.stages[1].blocks[1].attn.mixer.scale, ema["block2.1.attn.scale"])
    ddp = {"model": {"module." + k: v for k, v in raw.items()}}
    model.load_state_dict(pvt.checkpoint_filter_fn(ddp, model))
    torch.testing.assert_close(model.stages[0].pos_embed, raw["pos_embed1"])
    native = model.state_dict()
    filtered = pvt.checkpoint_filter_fn(native, model)
    assert list(filtered) == list(native) and all(filtered[k] is native[k] for k in native)
    # PVTv2: timm's renames (norm{i}, dwconv.dwconv) plus the attention's; native passes unchanged.
    sd2 = _small_sd("flatten_pvt_v2_b0")
    v2 = _small_model("flatten_pvt_v2_b0")
    out = linear_pvt_v2.checkpoint_filter_fn({"model": sd2, "state_dict_ema": sd2, "epoch": 1}, v2)
    assert sorted(out) == sorted(v2.state_dict())
    torch.testing.assert_close(out["stages.3.norm.weight"], sd2["norm4.weight"])
    torch.testing.assert_close(out["stages.1.blocks.1.mlp.dwconv.weight"], sd2["block2.1.mlp.dwconv.dwconv.weight"])
    torch.testing.assert_close(out["stages.2.blocks.0.attn.mixer.dwc.weight"], sd2["block3.0.attn.dwc.weight"])
    native2 = v2.state_dict()
    assert all(linear_pvt_v2.checkpoint_filter_fn(native2, v2)[k] is native2[k] for k in native2)
    # InLine's dynamic-kernel generator.
    sd3 = _small_sd("inline_pvt_t")
    out3 = pvt.checkpoint_filter_fn(sd3, _small_model("inline_pvt_t"))
    torch.testing.assert_close(out3["stages.3.blocks.0.attn.mixer.residual.2.weight"],
                               sd3["block4.0.attn.residual.2.weight"])


def test_training_checkpoint_through_a_state_dict_overlay():
    """A training-checkpoint container (raw + EMA weights and non-tensor entries) handed over as a
    state dict: the raw weights load by default."""
    name = "inline_pvt_t"
    family, kw = SMALL[name]
    raw, ema = _small_sd(name, seed=5), _small_sd(name, seed=6)
    container = {"model": raw, "state_dict_ema": ema, "epoch": 299, "config": SimpleNamespace(MODEL="inline_pvt_tiny")}
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=container),
                              **{**kw, "img_size": IMG}).eval()
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        assert _rel_err(model(x), official_forward(family, raw, x, kw["num_heads"])) <= 1e-4
    ema_model = timm.create_model(name, pretrained=True, **{**kw, "img_size": IMG}, pretrained_cfg_overlay=dict(
        state_dict=unwrap_checkpoint(container, prefer_ema=True)))
    torch.testing.assert_close(ema_model.head.weight, ema["head.weight"])


def test_missing_or_foreign_keys_are_errors(tmp_path):
    sd = _small_sd("inline_pvt_t")
    del sd["block2.1.attn.residual.0.weight"]
    with pytest.raises(ValueError, match=r"missing keys stages\.1\.blocks\.1\.attn\.mixer\.residual\.0\.weight"):
        pvt.checkpoint_filter_fn(sd, _small_model("inline_pvt_t"))
    # A FLatten checkpoint has no InLine residual generator (and an extra norm): clear error.
    with pytest.raises(ValueError, match="missing keys"):
        pvt.checkpoint_filter_fn(_small_sd("flatten_pvt_t"), _small_model("inline_pvt_t"))


def test_checkpoint_at_another_resolution_is_resized(tmp_path):
    """A 64-px checkpoint loads into a model built for 96 px (tables resized as the official fine-tune loader)."""
    sd = _small_sd("flatten_pvt_t")
    path = tmp_path / "ckpt.pth"
    torch.save({"model": sd}, path)
    _, kw = SMALL["flatten_pvt_t"]
    model = timm.create_model("flatten_pvt_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **dict(kw, img_size=96))
    assert model.stages[0].pos_embed.shape == (1, 24 * 24, 16)
    assert model.stages[3].blocks[0].attn.mixer.positional_encoding.shape == (1, 3 * 3, 64)
    assert torch.isfinite(model(torch.randn(1, 3, 96, 96))).all()


@pytest.mark.parametrize("name", list(SMALL))
def test_features_only_and_new_head_on_a_loaded_checkpoint(tmp_path, name):
    family, kw = SMALL[name]
    sd = _small_sd(name, seed=4)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": sd}, path)
    feats = _small_model(name, path, features_only=True, out_indices=(1, 3)).eval()
    assert feats.feature_info.channels() == [32, 64] and feats.feature_info.reduction() == [8, 32]
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        outs = feats(x)
        _, ref_stages = official_forward(family, sd, x, kw["num_heads"], return_stages=True)
    for out, ref in zip(outs, (ref_stages[1], ref_stages[3])):
        assert out.shape == ref.shape and _rel_err(out, ref) <= 1e-4
    model = _small_model(name, path, num_classes=5)    # the classifier is dropped, the body loads
    assert model.head.weight.shape == (5, 64)
    torch.testing.assert_close(model.stages[2].blocks[0].attn.kv.weight, sd["block3.0.attn.kv.weight"])
    torch.testing.assert_close(model.patch_embed.proj.weight, sd["patch_embed1.proj.weight"])


@pytest.mark.parametrize("name", ["flatten_pvt_t", "flatten_pvt_v2_b0", "inline_pvt_t"])
def test_forward_backward_small_and_non_square(name):
    model = timm.create_model(name, num_classes=7)   # official sizes, official drop-path rates
    for size in [(32, 32), (50, 83)]:                # 50×83: not multiples of 32 (padding / ceil grids)
        x = torch.randn(2, 3, *size)
        out = model(x)
        assert out.shape == (2, 7) and torch.isfinite(out).all()
        model.zero_grad()
        out.square().mean().backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"parameters without gradient: {missing[:5]}"
    if name == "flatten_pvt_t":   # the official, never-applied final norm: kept, frozen
        assert not model.unused_norm.weight.requires_grad and model.unused_norm.weight.grad is None


@pytest.mark.parametrize("name", list(SMALL))
def test_timm_api(name):
    model = _small_model(name).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        logits = model(x)
        final, inter = model.forward_intermediates(x)
        assert [t.shape[1:] for t in inter] == [(16, 16, 24), (32, 8, 12), (48, 4, 6), (64, 2, 3)]
        torch.testing.assert_close(final, model.forward_features(x))
        assert len(model.forward_intermediates(x, indices=2, intermediates_only=True)) == 2
        assert model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)[0].shape[1] == 16
        pre = model.forward_head(final, pre_logits=True)
        assert pre.shape == (2, model.num_features) == (2, 64)
        torch.testing.assert_close(model.forward_head(final), logits)
    assert model.get_classifier() is model.head
    assert model.no_weight_decay() in (set(), {})
    groups = timm.models.group_parameters(model, model.group_matcher(coarse=False))
    assert sum(len(v) for v in groups.values()) == len(list(model.named_parameters()))
    create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    # Gradient checkpointing gives the same numbers (no dropout at eval).
    model.set_grad_checkpointing(True)
    xg = x.clone().requires_grad_(True)
    torch.testing.assert_close(model(xg), logits)
    model.set_grad_checkpointing(False)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)
    pruned = _small_model(name)
    assert pruned.prune_intermediate_layers(indices=[1]) == [1]
    assert len(pruned.stages) == 2 and pruned(x).shape == (2, 32, 8, 12)  # head and pooling pruned
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.forward_intermediates(torch.randn(3, 64, 64))


def test_pretrained_cfgs_and_preprocessing():
    released = {"flatten_pvt_t": "3ab1d773f19d45648690", "flatten_pvt_v2_b0": "5d1f01532b104da28e7b",
                "inline_pvt_t": "90ac52b1555b401eb5e6", "inline_pvt_s": "1ab953b2479d433080a3",
                "inline_pvt_m": "a72aec31e6084bc0a280", "inline_pvt_l": "efd91318ba964f01b288"}
    assert sorted(timm.list_pretrained(["flatten_pvt*", "inline_pvt*"])) == sorted(f"{n}.in1k" for n in released)
    for name in EXACT:
        cfg = timm.models.get_pretrained_cfg(name)
        if name in released:
            assert cfg.tag == "in1k" and cfg.url == f"https://cloud.tsinghua.edu.cn/f/{released[name]}/?dl=1"
        else:
            assert cfg.tag == "untrained" and not cfg.url
        assert cfg.origin_url.startswith("https://github.com/LeapLabTHU/")
        assert cfg.paper_ids == ("arXiv:2412.06590" if name.startswith("inline") else "arXiv:2308.00442")
        assert (cfg.input_size, cfg.crop_pct, cfg.crop_mode, cfg.interpolation) == ((3, 224, 224), 0.875, "squash",
                                                                                      "bicubic")
        assert cfg.mean == (0.485, 0.456, 0.406) and cfg.std == (0.229, 0.224, 0.225)
    # Official eval: the whole image squashed to 256×256, then a 224 center crop.
    with torch.device("meta"):
        model = timm.create_model("inline_pvt_t")
    transform = create_transform(**resolve_data_config({}, model=model))
    sizes = [getattr(t, "size", None) for t in transform.transforms]
    assert (256, 256) in [tuple(s) if isinstance(s, (list, tuple)) else s for s in sizes]
