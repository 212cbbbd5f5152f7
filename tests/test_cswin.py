"""FLatten-CSWin and InLine-CSWin: sizes, official checkpoints, any input size, the timm API.

The official weights cannot be downloaded here, so the checkpoint tests write random weights in the
official key layout and shapes (built by tests/official_reference_cswin.py), load them with
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))`` and compare with
that module's independent functional forward. They use a reduced configuration (16 channels, depths
1-2-2-1, 64 px, stripe width 2) through the registered names: every block type is present — global
linear attention + LePE in stages 1–2, two-branch stripes in stage 3, one window in stage 4 — and
the merges, norm and head.
"""
import math

import pytest
import safetensors.torch
import timm
import torch
from timm.data import create_transform, resolve_data_config
from timm.optim import create_optimizer_v2

import linvision  # noqa: F401  (registers the models)
from linvision.backbones._builder import unwrap_checkpoint
from linvision.backbones.cswin import CSWinTransformer, checkpoint_filter_fn
from official_reference_cswin import official_forward, official_shapes, official_state_dict

NAMES = ["flatten_cswin_t", "flatten_cswin_s", "flatten_cswin_b", "flatten_cswin_b_384",
         "inline_cswin_t", "inline_cswin_s", "inline_cswin_b", "inline_cswin_b_384"]

# name: (exact count, published figure in M, its decimals, embed_dim, depths, heads, img, official key count)
OFFICIAL = {
    "flatten_cswin_t": (21_201_768, 21.20, 2, 64, (2, 4, 18, 1), (2, 4, 8, 16), 224, 430),
    "flatten_cswin_s": (35_451_752, 35.45, 2, 64, (2, 4, 32, 2), (2, 4, 8, 16), 224, 668),
    "flatten_cswin_b": (74_867_032, 74.87, 2, 96, (3, 6, 29, 2), (4, 8, 16, 32), 224, 674),
    "flatten_cswin_b_384": (78_369_112, 78.37, 2, 96, (3, 6, 29, 2), (4, 8, 16, 32), 384, 674),
    "inline_cswin_t": (20_604_520, 20.605, 3, 64, (2, 4, 18, 1), (2, 4, 8, 16), 224, 430),
    "inline_cswin_s": (33_032_872, 33.033, 3, 64, (3, 6, 29, 2), (2, 4, 8, 16), 224, 674),
    "inline_cswin_b": (73_413_640, 73.414, 3, 96, (3, 6, 29, 2), (4, 8, 16, 32), 224, 674),
    "inline_cswin_b_384": (73_413_640, 73.414, 3, 96, (3, 6, 29, 2), (4, 8, 16, 32), 384, 674),
}

# Reduced configuration: stage grids 16, 8, 4 (two stripes of 2 per branch), 2 (one window).
SMALL = dict(embed_dim=16, depths=(1, 2, 2, 1), num_heads=(2, 4, 4, 8), img=64, split=2)
SMALL_KWARGS = dict(img_size=64, embed_dim=16, depths=(1, 2, 2, 1), num_heads=(2, 4, 4, 8),
                    split_sizes=(None, None, 2, None))
FAMILIES = {"flatten_cswin_t": "L", "inline_cswin_t": "I"}


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _small_official(name, seed=0):
    return official_state_dict(SMALL["embed_dim"], SMALL["depths"], SMALL["num_heads"], SMALL["img"],
                               FAMILIES[name], seed=seed)


def _reference(name, sd, x):
    return official_forward(sd, x, depths=SMALL["depths"], num_heads=SMALL["num_heads"], linear=FAMILIES[name],
                            split=SMALL["split"])


def _save(sd, tmp_path, name="ckpt"):
    """Official keys in a ``.safetensors`` file (containers are tested on the filter directly)."""
    path = tmp_path / f"{name}.safetensors"
    safetensors.torch.save_file(sd, str(path))
    return path


def _load_small(name, sd, tmp_path, **kwargs):
    path = _save(sd, tmp_path, name)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             **dict(SMALL_KWARGS, **kwargs))


# ------------------------------------------------------------------ sizes and layout
def test_registry():
    assert set(NAMES) <= set(timm.list_models(["flatten_cswin_*", "inline_cswin_*"]))


@pytest.mark.parametrize("name", NAMES)
def test_exact_parameter_count_and_official_layout(name):
    count, figure, decimals, dim, depths, heads, img, n_keys = OFFICIAL[name]
    assert round(count / 1e6, decimals) == figure
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count
    shapes = official_shapes(dim, depths, heads, img, "L" if name.startswith("flatten") else "I")
    assert len(shapes) == n_keys
    assert sum(math.prod(s) for s in shapes.values()) == count
    # The filter maps every official key onto a model key of the same shape, and covers the model.
    official = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    converted = checkpoint_filter_fn(official, model)
    native = model.state_dict()
    assert set(converted) == set(native)
    assert all(converted[k].shape == native[k].shape for k in native)


def test_model_structure_follows_the_official_models():
    with torch.device("meta"):
        fl = timm.create_model("flatten_cswin_b_384")
        il = timm.create_model("inline_cswin_s")
    assert [len(s.blocks) for s in il.stages] == [3, 6, 29, 2]             # InLine-S ≠ FLatten-S depths
    blocks = [s.blocks[0] for s in fl.stages]
    assert [len(b.attns) for b in blocks] == [1, 1, 2, 1]
    assert [b.attns[0].attn_type for b in blocks] == ["focused", "focused", "softmax", "softmax"]
    assert [a.stripe for a in blocks[2].attns] == ["vertical", "horizontal"]
    assert [a.dim for a in blocks[2].attns] == [192, 192] and [a.num_heads for a in blocks[2].attns] == [8, 8]
    assert blocks[2].attns[0].split_size == 12
    assert blocks[0].attns[0].mixer.positional_encoding.shape == (1, 96 * 96, 96)
    assert blocks[1].attns[0].mixer.dwc.weight.shape == (24, 1, 5, 5)     # head_dim 24, shared by heads
    assert blocks[0].norm1.eps == 1e-5 and fl.stem.norm.eps == 1e-5 and fl.stages[1].downsample.norm.eps == 1e-5
    first_blocks = [s.blocks[0] for s in il.stages]
    assert [b.attns[0].attn_type for b in first_blocks] == ["inline", "inline", "softmax", "softmax"]


# ------------------------------------------------------------------ official checkpoints
@pytest.mark.parametrize("name", list(FAMILIES))
def test_official_checkpoint_reproduces_the_official_forward(tmp_path, name):
    sd = _small_official(name)
    model = _load_small(name, sd, tmp_path).eval()          # timm loads strictly (pretrained_strict=True)
    x = torch.randn(2, 3, 64, 64)
    # A non-square size whose stage-3 map (5×7) is not a multiple of the stripe width: padded stripes
    # and a resized positional encoding, against the reference's sliced stripes.
    x_odd = torch.randn(1, 3, 72, 100)
    with torch.no_grad():
        ref, ref_odd = _reference(name, sd, x), _reference(name, sd, x_odd)
        out, out_odd = model(x), model(x_odd)
    assert ref.abs().mean() > 0.1
    assert _rel_err(out, ref) <= 1e-4
    assert _rel_err(out_odd, ref_odd) <= 1e-4


def test_filter_unwraps_containers_and_prefixes():
    model = timm.create_model("inline_cswin_t", **SMALL_KWARGS)
    raw, ema = _small_official("inline_cswin_t", seed=1), _small_official("inline_cswin_t", seed=2)
    container = {"model": {"module." + k: v for k, v in raw.items()}, "state_dict_ema": ema,
                 "optimizer": {"state": {}}, "epoch": 299, "config": {"MODEL": {"TYPE": "inline_cswin_tiny"}},
                 "max_accuracy": 83.2}
    container["model"]["module.n_averaged"] = 3  # non-tensor junk inside the state dict too
    out = checkpoint_filter_fn(container, model)             # 'model' by default, as the official eval
    assert set(out) == set(model.state_dict())
    torch.testing.assert_close(out["stem.conv.weight"], raw["stage1_conv_embed.0.weight"])
    torch.testing.assert_close(out["stages.1.downsample.conv.weight"], raw["merge1.conv.weight"])
    torch.testing.assert_close(out["stages.2.blocks.1.attns.1.lepe.bias"], raw["stage3.1.attns.1.get_v.bias"])
    torch.testing.assert_close(out["stages.0.blocks.0.attns.0.mixer.residual.2.weight"],
                               raw["stage1.0.attns.0.residual.2.weight"])
    out_ema = checkpoint_filter_fn(unwrap_checkpoint(container, prefer_ema=True), model)
    torch.testing.assert_close(out_ema["head.weight"], ema["head.weight"])
    # The same container in memory through timm's state_dict source: loads 'model' strictly.
    loaded = timm.create_model("inline_cswin_t", pretrained=True, pretrained_cfg_overlay=dict(state_dict=container),
                               **SMALL_KWARGS)
    torch.testing.assert_close(loaded.head.weight, raw["head.weight"])
    # Native state dicts pass through unchanged.
    native = model.state_dict()
    again = checkpoint_filter_fn(native, model)
    assert list(again) == list(native) and all(again[k] is native[k] for k in native)


def test_positional_encoding_resized_on_load(tmp_path):
    """A 64-px FLatten checkpoint loaded into a model built for 96 px: the filter resizes the tables
    bicubically (as the official fine-tune loader does), which is exactly what the 64-px model does
    at run time at 96 px."""
    sd = _small_official("flatten_cswin_t", seed=3)
    path = _save(sd, tmp_path)
    small = _load_small("flatten_cswin_t", sd, tmp_path).eval()
    big = timm.create_model("flatten_cswin_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                            **dict(SMALL_KWARGS, img_size=96)).eval()
    assert big.stages[0].blocks[0].attns[0].mixer.positional_encoding.shape == (1, 24 * 24, 16)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(big(x), small(x))
        assert _rel_err(big(x), _reference("flatten_cswin_t", sd, x)) <= 1e-4


@pytest.mark.parametrize("name", list(FAMILIES))
def test_features_only_and_new_head_on_a_loaded_checkpoint(tmp_path, name):
    sd = _small_official(name, seed=4)
    feats = _load_small(name, sd, tmp_path, features_only=True, out_indices=(1, 3)).eval()
    assert feats.feature_info.channels() == [32, 128] and feats.feature_info.reduction() == [8, 32]
    torch.testing.assert_close(feats.model.stages[3].blocks[0].qkv.weight, sd["stage4.0.qkv.weight"])
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        outs = feats(x)
    assert [tuple(o.shape) for o in outs] == [(2, 32, 8, 12), (2, 128, 2, 3)]
    full = _load_small(name, sd, tmp_path).eval()
    with torch.no_grad():
        ref = full.forward_intermediates(x, indices=(1, 3), intermediates_only=True)
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b)

    tuned = _load_small(name, sd, tmp_path, num_classes=7)
    assert tuned.head.weight.shape == (7, 128)
    torch.testing.assert_close(tuned.stem.conv.weight, sd["stage1_conv_embed.0.weight"])
    torch.testing.assert_close(tuned.norm.weight, sd["norm.weight"])
    with torch.no_grad():
        assert tuned(x).shape == (2, 7)


# ------------------------------------------------------------------ any input size
@pytest.mark.parametrize("name", list(FAMILIES))
def test_forward_backward_small_and_non_square(name):
    model = timm.create_model(name, num_classes=5, drop_path_rate=0.1)
    for size in [(64, 64), (45, 83)]:
        x = torch.randn(2, 3, *size)
        out = model(x)
        assert out.shape == (2, 5) and torch.isfinite(out).all()
        model.zero_grad()
        out.square().mean().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"parameters without gradient: {missing[:5]}"


@pytest.mark.parametrize("size", [(3, 3), (17, 9), (97, 131)])
def test_any_input_size_the_stem_accepts(size):
    model = timm.create_model("inline_cswin_t", **SMALL_KWARGS).eval()
    with torch.no_grad():
        feats = model.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
    h, w = (size[0] - 3) // 4 + 1, (size[1] - 3) // 4 + 1
    for f in feats:
        assert f.shape[-2:] == (h, w) and torch.isfinite(f).all()
        h, w = -(-h // 2), -(-w // 2)


@pytest.mark.parametrize("bad", [torch.randn(3, 64, 64), torch.randn(1, 4, 64, 64), torch.randn(1, 3, 2, 64)])
def test_bad_input_is_a_value_error(bad):
    model = timm.create_model("flatten_cswin_t", **SMALL_KWARGS)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(bad)


def test_linear_attention_in_striped_stages_is_refused():
    with pytest.raises(ValueError, match="one window over the whole map"):
        CSWinTransformer(**dict(SMALL_KWARGS, split_sizes=(2, None, 2, None)))


# ------------------------------------------------------------------ timm API
@pytest.mark.parametrize("name", list(FAMILIES))
def test_timm_api_conformance(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 64, 64)
    assert model.num_classes == model.pretrained_cfg["num_classes"] == 1000
    assert model.num_features == model.head_hidden_size == 512
    sd = model.state_dict()
    assert model.pretrained_cfg["classifier"] + ".weight" in sd and model.pretrained_cfg["first_conv"] + ".weight" in sd
    assert model.no_weight_decay() == set()
    with torch.no_grad():
        feat = model.forward_features(x)
        assert feat.shape == (1, 2, 2, 512)                                  # NHWC, as timm's Swin
        assert model.forward_head(feat, pre_logits=True).shape == (1, 512)
        torch.testing.assert_close(model(x), model.forward_head(feat))
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, feat)
        assert [t.shape[1] for t in inter] == [f["num_chs"] for f in model.feature_info] == [64, 128, 256, 512]
        assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
        normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], feat.permute(0, 3, 1, 2))
        early = model.forward_intermediates(x, indices=[0, -3], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[1], inter[1])
        nhwc = model.forward_intermediates(x, indices=[2], output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(nhwc[0], inter[2].permute(0, 2, 3, 1))
    assert model.get_classifier() is model.head
    assert set(model.group_matcher()) == {"stem", "blocks"}
    create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)  # uses group_matcher
    model.reset_classifier(5)
    with torch.no_grad():
        assert model(x).shape == (1, 5)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (1, 512)
    model.reset_classifier(0, "")
    with torch.no_grad():
        assert model(x).shape == (1, 2, 2, 512)


def test_grad_checkpointing_gives_the_same_result():
    model = timm.create_model("flatten_cswin_t", **SMALL_KWARGS).eval()
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    ref = model(x)
    model.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in model.stages)
    out = model(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_features_only_default_indices():
    feats = timm.create_model("inline_cswin_t", features_only=True, **SMALL_KWARGS)
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    assert feats.feature_info.channels() == [16, 32, 64, 128]


# ------------------------------------------------------------------ pretrained cfgs
def test_pretrained_cfgs_and_eval_preprocessing():
    tsinghua = "https://cloud.tsinghua.edu.cn/f/{}/?dl=1"
    released = {"flatten_cswin_t.in1k": "48ba765ba8b0451d9d5a", "inline_cswin_t.in1k": "49fa2ecc543647c4b970",
                "inline_cswin_s.in1k": "59f4e65f776f4052b93c", "inline_cswin_b.in1k": "91e17121df284ae38521"}
    for tag, file_id in released.items():
        cfg = timm.models.get_pretrained_cfg(tag)
        assert cfg.url == tsinghua.format(file_id)
        assert cfg.paper_ids and cfg.origin_url.startswith("https://github.com/LeapLabTHU/") and cfg.license
    for tag in ["flatten_cswin_s.untrained", "flatten_cswin_b.untrained", "flatten_cswin_b_384.untrained",
                "inline_cswin_b_384.untrained"]:
        assert not timm.models.get_pretrained_cfg(tag).url
    # Official eval: bicubic square resize to ⌊256/224·S⌋ (438 at 384), centre crop S.
    for name, size, resize in [("inline_cswin_t", 224, 256), ("flatten_cswin_b_384", 384, 438)]:
        with torch.device("meta"):
            model = timm.create_model(name)
        cfg = resolve_data_config({}, model=model)
        assert cfg["input_size"] == (3, size, size) and cfg["interpolation"] == "bicubic"
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
        ops = create_transform(**cfg).transforms
        assert tuple(ops[0].size) == (resize, resize) and tuple(ops[1].size) == (size, size)
