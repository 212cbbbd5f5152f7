"""FLatten-Swin and InLine-Swin (linvision/backbones/linear_swin.py).

The official weights cannot be downloaded here, so the checkpoint tests write random weights in the
official key layout (tests/official_reference_swin.py, buffers included),
load them with ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))``
and compare with an independent functional forward of the official model. To stay cheap those
tests use reduced widths/depths at 128 px (S window 4) that still contain every block type.
"""
import re

import pytest
import timm
import torch
from timm.data import create_transform, resolve_data_config

import linvision  # noqa: F401  (registers the models)
from linvision.attn.grid import resize_token_table
from linvision.backbones.linear_swin import checkpoint_filter_fn, parse_attn_types
from official_reference_swin import official_forward, official_layout, is_buffer, random_official_state_dict

# Exact parameter counts. Per block of width C (d = 32 = C/heads): the Swin part is 12C² + 13C;
# an S block adds its (2w−1)²·heads bias table; FLatten adds scale C + positional table res²·C +
# DWC 25·32 + 32; InLine adds its kernel generator 10·C·(d + 1). Patch embed 48C₀ + 3C₀, patch
# merging 8C² + 8C, final norm 2C₃, head 1000·C₃ + 1000. The official counts, rounded: 29.19M,
# 50.51M, 88.97M, 91.43M; 29.224M, 49.793M, 88.350M, 88.465M.
PARAM_COUNTS = {
    "flatten_swin_t": 29_192_384,
    "flatten_swin_s": 50_510_288,
    "flatten_swin_b": 88_972_488,
    "flatten_swin_b_384": 91_433_928,
    "inline_swin_t": 29_223_544,
    "inline_swin_s": 49_793_296,
    "inline_swin_b": 88_350_120,
    "inline_swin_b_384": 88_465_320,
}
SPEC_PARAMS_M = {"flatten_swin_t": 29.19, "flatten_swin_s": 50.51, "flatten_swin_b": 88.97, "flatten_swin_b_384": 91.43,
                 "inline_swin_t": 29.224, "inline_swin_s": 49.793, "inline_swin_b": 88.350, "inline_swin_b_384": 88.465}
# name: (ATTN_TYPE, embed_dim, depths, heads, img, S window, official state-dict key count)
OFFICIAL = {
    "flatten_swin_t": ("LLSS", 96, (2, 2, 6, 2), (3, 6, 12, 24), 224, 7, 196),
    "flatten_swin_s": ("LLSS", 96, (2, 2, 18, 2), (3, 6, 12, 24), 224, 7, 370),
    "flatten_swin_b": ("LLSS", 128, (2, 2, 18, 2), (4, 8, 16, 32), 224, 7, 370),
    "flatten_swin_b_384": ("LLSS", 128, (2, 2, 18, 2), (4, 8, 16, 32), 384, 12, 370),
    "inline_swin_t": ("IIIS", 96, (2, 2, 6, 2), (3, 6, 12, 24), 224, 7, 205),
    "inline_swin_s": ("IISS", 96, (2, 2, 18, 2), (3, 6, 12, 24), 224, 7, 370),
    "inline_swin_b": ("IIMS2", 128, (2, 2, 18, 2), (4, 8, 16, 32), 224, 7, 373),
    "inline_swin_b_384": ("IIMS2", 128, (2, 2, 18, 2), (4, 8, 16, 32), 384, 12, 373),
}
# Reduced configs at 128 px: stage maps 32/16/8/4, S window 4, so stage 3 (8×8) has 4 windows with
# an unshifted and a shifted block and stage 4 clamps to one window. InLine's 'IIMS1' puts an
# InLine block, then a shifted (j = 1) and an unshifted (j = 2) S block in stage 3.
SMALL = {
    "flatten_swin_t": dict(attn_types="LLSS", embed_dim=16, depths=(1, 2, 2, 2), num_heads=(1, 2, 2, 4)),
    "inline_swin_t": dict(attn_types="IIMS1", embed_dim=16, depths=(2, 1, 3, 1), num_heads=(1, 2, 2, 4)),
}
SMALL_IMG, SMALL_WINDOW, SMALL_CLASSES = 128, 4, 10


def _small_official(name, seed=0):
    cfg = SMALL[name]
    return random_official_state_dict(cfg["attn_types"], cfg["embed_dim"], cfg["depths"], cfg["num_heads"],
                                      SMALL_IMG, SMALL_WINDOW, SMALL_CLASSES, seed=seed)


def _small_kwargs(name, **extra):
    return dict(dict(SMALL[name], img_size=SMALL_IMG, window_size=SMALL_WINDOW, num_classes=SMALL_CLASSES), **extra)


def _small_reference(name, sd, x):
    cfg = SMALL[name]
    return official_forward(sd, x, cfg["attn_types"], cfg["depths"], cfg["num_heads"], SMALL_WINDOW)


def _load_small(name, ckpt, **extra):
    overlay = dict(ckpt, num_classes=SMALL_CLASSES)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **_small_kwargs(name, **extra))


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------ sizes and layouts
@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_param_count_and_official_layout(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == PARAM_COUNTS[name]
    assert round(n / 1e6, 3 if name.startswith("inline") else 2) == SPEC_PARAMS_M[name]
    # The official layout holds the same parameters and converts onto the model key for key.
    attn, dim, depths, heads, img, window, n_keys = OFFICIAL[name]
    layout = official_layout(attn, dim, depths, heads, img, window)
    assert len(layout) == n_keys
    assert sum(torch.Size(s).numel() for k, s in layout.items() if not is_buffer(k)) == n
    official = {k: torch.empty(s, device="meta") for k, s in layout.items()}
    converted = checkpoint_filter_fn({"model": official}, model)  # raises on any missing/unexpected/mismatch
    assert converted.keys() == model.state_dict().keys()


def test_block_layout_of_inline_swin_b():
    with torch.device("meta"):
        model = timm.create_model("inline_swin_b")
    stage = model.layers[2]
    kinds = [getattr(b, "attn_type", "S") for b in stage.blocks]
    assert kinds == ["I", "I"] + ["S"] * 16
    # Shift on odd indices within the stage: block 2 unshifted, block 3 shifted.
    assert [b.shift_size for b in stage.blocks[2:5]] == [(0, 0), (3, 3), (0, 0)]
    assert model.layers[3].blocks[1].window_size == (7, 7) and model.layers[3].blocks[1].shift_size == (0, 0)
    assert all(getattr(b, "attn_type", None) == "I" for s in model.layers[:2] for b in s.blocks)


def test_parse_attn_types():
    assert parse_attn_types("IIMS2", (2, 2, 18, 2))[2] == ("I", "I") + ("S",) * 16
    assert parse_attn_types("LLMS1", (1, 1, 3, 1))[2] == ("L", "S", "S")
    assert parse_attn_types("LLSS", (2, 2, 6, 2)) == (("L",) * 2, ("L",) * 2, ("S",) * 6, ("S",) * 2)
    for bad in ("LLS", "LLMS", "LLSS2", "LIMS1", "XXSS", "IIMS3"):
        with pytest.raises(ValueError, match="attn_types"):
            parse_attn_types(bad, (2, 2, 2, 2))


# ------------------------------------------------------------------ official checkpoints
@pytest.mark.parametrize("name", list(SMALL))
def test_official_checkpoint_reproduces_official_forward(tmp_path, name):
    sd = _small_official(name)
    path = tmp_path / f"{name}.pth"
    torch.save({"model": sd, "epoch": 299, "max_accuracy": 82.1}, path)
    model = _load_small(name, dict(file=str(path))).eval()
    x = torch.randn(2, 3, SMALL_IMG, SMALL_IMG)
    with torch.no_grad():
        ours = model(x)
        ref = _small_reference(name, sd, x)
    assert ref.abs().mean() > 0.1  # non-trivial logits
    assert _rel_err(ours, ref) <= 1e-4
    # Every parameter came from the checkpoint (the official buffers were dropped and recomputed).
    native = model.state_dict()
    assert native["layers.1.downsample.reduction.weight"].equal(sd["layers.0.downsample.reduction.weight"])
    assert native["head.fc.weight"].equal(sd["head.weight"])


def test_filter_unwraps_containers_and_selects_ema():
    model = timm.create_model("flatten_swin_t", **_small_kwargs("flatten_swin_t"))
    raw, ema = _small_official("flatten_swin_t", seed=1), _small_official("flatten_swin_t", seed=2)
    container = {"model": {"module." + k: v for k, v in raw.items()}, "state_dict_ema": ema,
                 "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": None, "epoch": 299,
                 "max_accuracy": 82.1, "config": "MODEL: {TYPE: flatten_swin}"}
    key, official_key = "layers.0.blocks.0.attn.mixer.positional_encoding", "layers.0.blocks.0.attn.positional_encoding"
    assert checkpoint_filter_fn(container, model)[key].equal(raw[official_key])  # 'model' by default
    assert checkpoint_filter_fn(container, model, prefer_ema=True)[key].equal(ema[official_key])
    assert checkpoint_filter_fn({"state_dict_ema": ema}, model)[key].equal(ema[official_key])  # fallback
    # A native state dict passes unchanged.
    native = model.state_dict()
    out = checkpoint_filter_fn(native, model)
    assert out.keys() == native.keys() and all(out[k] is native[k] for k in native)
    # Through timm with the in-memory container: the 'model' weights are loaded.
    loaded = _load_small("flatten_swin_t", dict(state_dict=container))
    assert loaded.layers[0].blocks[0].attn.mixer.positional_encoding.equal(raw[official_key])


def test_filter_reports_missing_and_unexpected_keys():
    model = timm.create_model("inline_swin_t", **_small_kwargs("inline_swin_t"))
    sd = _small_official("inline_swin_t")
    del sd["layers.1.blocks.0.attn.residual.2.weight"]
    sd["layers.1.blocks.0.attn.positional_encoding"] = torch.zeros(1, 256, 32)
    with pytest.raises(ValueError) as err:
        checkpoint_filter_fn(sd, model)
    msg = str(err.value)
    assert "missing keys layers.1.blocks.0.attn.mixer.residual.2.weight" in msg
    assert "unexpected keys layers.1.blocks.0.attn.mixer.positional_encoding" in msg
    # A FLatten checkpoint is not an InLine model.
    with pytest.raises(ValueError, match=r"official layout\) does not match LinearSwinTransformer \(IIMS1\)"):
        checkpoint_filter_fn(random_official_state_dict("LLSS", 16, (2, 1, 3, 1), (1, 2, 2, 4), 128, 4, 10), model)


def test_filter_resizes_tables_to_another_resolution():
    sd = _small_official("flatten_swin_t")
    model = timm.create_model("flatten_swin_t", **_small_kwargs("flatten_swin_t", img_size=160, window_size=5))
    out = checkpoint_filter_fn(sd, model)
    pe = sd["layers.0.blocks.0.attn.positional_encoding"]  # (1, 32², 16) → (1, 40², 16)
    expected = resize_token_table(pe.transpose(1, 2).reshape(1, 16, 32, 32), (40, 40))
    expected = expected.reshape(1, 16, -1).transpose(1, 2)
    torch.testing.assert_close(out["layers.0.blocks.0.attn.mixer.positional_encoding"], expected)
    assert out["layers.2.blocks.1.attn.relative_position_bias_table"].shape == (81, 2)  # window 4 → 5
    model.load_state_dict(out)
    assert model(torch.randn(1, 3, 160, 160)).shape == (1, SMALL_CLASSES)


def test_features_only_and_new_head_on_loaded_checkpoint(tmp_path):
    name = "inline_swin_t"
    sd = _small_official(name, seed=3)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": sd}, path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **dict(_small_kwargs(name), num_classes=5))
    assert model.head.fc.weight.shape == (5, 128)
    assert model.layers[2].blocks[0].attn.mixer.residual[2].weight.equal(sd["layers.2.blocks.0.attn.residual.2.weight"])
    feats = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), features_only=True,
                              out_indices=(1, 3), **_small_kwargs(name)).eval()
    assert feats.feature_info.channels() == [32, 128] and feats.feature_info.reduction() == [8, 32]
    x = torch.randn(2, 3, SMALL_IMG, SMALL_IMG)
    outs = feats(x)
    assert [tuple(o.shape) for o in outs] == [(2, 32, 16, 16), (2, 128, 4, 4)]
    # The maps are the official model's stage outputs (NCHW).
    full = _load_small(name, dict(file=str(path))).eval()
    with torch.no_grad():
        _, inter = full.forward_intermediates(x)
    torch.testing.assert_close(outs[1], inter[3])
    torch.testing.assert_close(outs[0], inter[1])


# ------------------------------------------------------------------ any input size
@pytest.fixture(scope="module", params=["flatten_swin_t", "inline_swin_t"])
def full_model(request):
    torch.manual_seed(0)
    return timm.create_model(request.param)


@pytest.mark.parametrize("size", [(64, 64), (70, 100)])
def test_forward_backward_small_and_non_square(full_model, size):
    full_model.train()
    x = torch.randn(2, 3, *size, requires_grad=True)
    out = full_model(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    stage0 = full_model.layers[0].blocks[0].attn
    assert stage0.qkv.weight.grad is not None and torch.isfinite(stage0.qkv.weight.grad).all()
    full_model.zero_grad(set_to_none=True)
    feats = full_model.eval().forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
    grid = (-(-size[0] // 4), -(-size[1] // 4))
    assert [tuple(f.shape[-2:]) for f in feats][0] == grid


def test_positional_table_follows_the_runtime_grid():
    # Built at 128 and run at 96×160, the linear stages resize the positional tables on the fly
    # exactly as the checkpoint filter does for a model built at 96×160.
    name = "flatten_swin_t"
    sd = _small_official(name, seed=4)
    native = _load_small(name, dict(state_dict=sd)).eval()
    rebuilt = _load_small(name, dict(state_dict=sd), img_size=(96, 160)).eval()
    assert rebuilt.layers[0].blocks[0].attn.mixer.positional_encoding.shape == (1, 24 * 40, 16)
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        a = native.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        b = rebuilt.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        for fa, fb in zip(a, b):
            torch.testing.assert_close(fa, fb)
        # timm's set_input_size re-derives the windows; the linear blocks follow the new grid.
        native.set_input_size(img_size=(96, 160), window_size=SMALL_WINDOW)
        assert native.layers[0].blocks[0].input_resolution == (24, 40)
        assert native.layers[3].blocks[0].window_size == (3, 4)
        assert native(x).shape == (1, SMALL_CLASSES)


# ------------------------------------------------------------------ timm API
def test_timm_api():
    name = "inline_swin_t"
    model = timm.create_model(name, **_small_kwargs(name, drop_path_rate=0.0)).eval()
    x = torch.randn(2, 3, SMALL_IMG, SMALL_IMG)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        assert feats.shape == (2, 4, 4, 128)  # timm Swin: NHWC
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, 128)
        torch.testing.assert_close(model.forward_head(feats), logits)
        final, inter = model.forward_intermediates(x)
        assert [tuple(t.shape) for t in inter] == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4)]
        torch.testing.assert_close(final, feats)
        assert len(model.forward_intermediates(x, indices=2, intermediates_only=True)) == 2
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), logits)
        model.set_grad_checkpointing(False)
    assert model.get_classifier() is model.head.fc
    nwd = model.no_weight_decay()
    assert nwd and all("relative_position_bias_table" in n for n in nwd)
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sum(len(g) for g in groups.values()) == len(list(model.named_parameters()))
    assert len(timm.models.group_parameters(model, model.group_matcher(coarse=True))) == 6
    model.reset_classifier(0)
    assert model(x).shape == (2, 128)
    model.reset_classifier(7, "avg")
    assert model(x).shape == (2, 7)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(2, 1, 64, 64))


def test_pretrained_cfgs():
    urls = {}
    for name in PARAM_COUNTS:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.tag in ("in1k", "untrained")
        assert cfg.interpolation == "bicubic" and cfg.crop_mode == "squash"
        assert cfg.mean == (0.485, 0.456, 0.406) and cfg.std == (0.229, 0.224, 0.225)
        assert cfg.classifier == "head.fc" and cfg.first_conv == "patch_embed.proj"
        assert cfg.paper_ids and cfg.origin_url and cfg.license
        img = 384 if name.endswith("384") else 224
        assert cfg.input_size == (3, img, img) and cfg.crop_pct == (1.0 if img == 384 else 224 / 256)
        urls[name] = cfg.url
    assert not urls["inline_swin_b_384"]
    assert urls["flatten_swin_t"] == "https://cloud.tsinghua.edu.cn/f/e1518e76703e4e57a7f2/?dl=1"
    assert all(re.fullmatch(r"https://cloud\.tsinghua\.edu\.cn/f/[0-9a-f]{20}/\?dl=1", u)
               for n, u in urls.items() if n != "inline_swin_b_384")
    # Official eval: bicubic resize to a square 256 (aspect ratio ignored), center crop 224.
    model_cfg = timm.models.get_pretrained_cfg("flatten_swin_t").to_dict()
    tf = create_transform(**resolve_data_config({}, pretrained_cfg=model_cfg))
    assert tf.transforms[0].size == (256, 256) and tf.transforms[1].size == (224, 224)
