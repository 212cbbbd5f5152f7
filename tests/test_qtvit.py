"""QT-ViT (qtvit_1..6): sizes, official checkpoints, EfficientViT initialisation, the timm API.

The official weights cannot be downloaded here, so the checkpoint tests build official-format
state dicts with random weights from the official layout (tests/official_reference_qtvit.py),
load them through ``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))``
and compare with the independent functional forward of the official code in the same file.
"""
import logging
import math
import re

import pytest
import safetensors.torch
import timm
import torch
from timm.optim import create_optimizer_v2
from torch import nn

import linvision  # noqa: F401  (registers the models)
from linvision.serialization import unwrap_checkpoint
from linvision.backbones.qtvit import checkpoint_filter_fn, convert_official_keys, efficientvit_to_qtvit
from official_reference_qtvit import CONFIGS, Config, official_forward, official_layout

NAMES = [f"qtvit_{i}" for i in range(1, 7)]
# Parameters of the official models (create_cls_model('b1' ... 'l3') of the AMD_QTViT code).
EXACT_PARAMS = {"qtvit_1": 9_353_135, "qtvit_2": 24_858_210, "qtvit_3": 49_700_727,
                "qtvit_4": 52_955_534, "qtvit_5": 64_108_944, "qtvit_6": 246_840_624}
REPORTED_MILLIONS = {"qtvit_1": 9.35, "qtvit_2": 24.86, "qtvit_3": 49.70,
                     "qtvit_4": 52.96, "qtvit_5": 64.11, "qtvit_6": 246.84}
# A reduced L-series configuration built through the same class (qtvit_4's QtVitLarge).
SMALL_L = Config("l", (8, 16, 16, 32, 64), (1, 1, 1, 1, 2), 16, (48, 64), num_classes=10)
SMALL_L_ARGS = dict(widths=SMALL_L.widths, depths=SMALL_L.depths, head_dim=SMALL_L.dim,
                    head_widths=SMALL_L.head_widths, num_classes=SMALL_L.num_classes)
QT_SUFFIX = re.compile(r"\.context_module\.main\.attn\.(positional_encoding|constant|bn\.(weight|bias|running_mean|"
                       r"running_var|num_batches_tracked))$")


def random_official_state_dict(cfg: Config, seed: int = 0):
    """Random weights in the official layout, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in official_layout(cfg).items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            out[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith("ones_scale1"):
            out[k] = torch.rand((), generator=g) + 0.5
        elif k.endswith("positional_encoding"):
            out[k] = 0.3 * torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            out[k] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif k.endswith("weight"):
            out[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[k] = 0.1 * torch.randn(shape, generator=g)
    return out


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def qtvit_1_file(tmp_path_factory):
    sd = random_official_state_dict(CONFIGS["qtvit_1"])
    path = tmp_path_factory.mktemp("qtvit") / "qtvit_1.safetensors"
    safetensors.torch.save_file(sd, str(path))
    return sd, str(path)


# ------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("name", NAMES)
def test_exact_parameter_counts_and_official_layout(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == EXACT_PARAMS[name]
    assert round(n / 1e6, 2) == REPORTED_MILLIONS[name]
    layout = official_layout(CONFIGS[name])
    assert n == sum(math.prod(s) for k, s in layout.items()
                    if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    # Every official key maps onto the model's key of the same shape, one to one.
    converted = convert_official_keys({k: torch.empty(s, device="meta") for k, s in layout.items()})
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == shapes


def test_layout_facts():
    layout = official_layout(CONFIGS["qtvit_1"])
    assert len(layout) == 321 and len(official_layout(CONFIGS["qtvit_4"])) == 313
    assert layout["backbone.stages.3.op_list.1.context_module.main.positional_encoding"] == (1, 512, 7, 7)
    assert layout["backbone.stages.2.op_list.1.context_module.main.positional_encoding"] == (1, 256, 14, 14)


def test_large_models_use_norm_eps_1e_7():
    with torch.device("meta"):
        large, base = timm.create_model("qtvit_5"), timm.create_model("qtvit_2")
    norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)
    assert {m.eps for m in large.modules() if isinstance(m, norms)} == {1e-7}
    assert {m.eps for m in base.modules() if isinstance(m, norms)} == {1e-5}
    attn = large.stages[3].blocks[1].context_module.main.attn
    assert attn.bn.eps == 1e-7 and attn.positional_encoding.shape == (1, 1024, 7, 7)


# ------------------------------------------------------------------------------ official checkpoints
def test_official_checkpoint_reproduces_official_forward(qtvit_1_file):
    sd, path = qtvit_1_file
    model = timm.create_model("qtvit_1", pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    for size in (224, 256):  # 256: the positional encodings are resized bicubically
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            out = model(x)
        assert _rel_err(out, official_forward(x, sd, CONFIGS["qtvit_1"])) <= 1e-4


def test_official_large_checkpoint_reproduces_official_forward(tmp_path):
    sd = random_official_state_dict(SMALL_L, seed=1)
    path = tmp_path / "small_l.safetensors"
    safetensors.torch.save_file(sd, str(path))
    model = timm.create_model("qtvit_4", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
                              **SMALL_L_ARGS).eval()
    for size in (224, 96):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            out = model(x)
        assert _rel_err(out, official_forward(x, sd, SMALL_L)) <= 1e-4


def test_filter_on_container_raw_ema_and_native():
    model = timm.create_model("qtvit_4", **SMALL_L_ARGS)
    raw, ema = random_official_state_dict(SMALL_L, 2), random_official_state_dict(SMALL_L, 3)
    container = {"state_dict": raw, "ema": {0.9998: ema}, "epoch": 319, "best_val": 85.2,
                 "optimizer": {"state": {}, "param_groups": [{"lr": 0.0}]}, "lr_scheduler": {"last_epoch": 5},
                 "scaler": None}
    key = "stages.3.blocks.1.context_module.main.attn.positional_encoding"
    official_key = "backbone.stages.4.op_list.1.context_module.main.positional_encoding"
    out = checkpoint_filter_fn(container, model)
    assert set(out) == set(model.state_dict())
    assert out[key] is raw[official_key]
    assert out["head.classifier.4.weight"] is raw["head.op_list.3.linear.weight"]
    assert out["stem.res0.main.conv1.conv.weight"] is raw["backbone.stages.0.op_list.1.main.conv1.conv.weight"]
    assert out["stages.0.blocks.0.main.spatial_conv.conv.weight"] is raw[
        "backbone.stages.1.op_list.0.main.spatial_conv.conv.weight"]
    out_ema = checkpoint_filter_fn(unwrap_checkpoint(container, prefer_ema=True), model)
    assert out_ema[key] is ema[official_key]
    model.load_state_dict(out_ema)
    native = model.state_dict()
    again = checkpoint_filter_fn(native, model)
    assert list(again) == list(native) and all(again[k] is native[k] for k in native)
    assert checkpoint_filter_fn({"model": native}, model).keys() == native.keys()


# ------------------------------------------------------------------------------ EfficientViT initialisation
def test_efficientvit_checkpoint_initialises_qtvit(tmp_path, caplog):
    evit = timm.create_model("efficientvit_b1")
    sd = evit.state_dict()
    path = tmp_path / "efficientvit_b1.safetensors"
    safetensors.torch.save_file(sd, str(path))
    with caplog.at_level(logging.WARNING, logger="linvision.backbones.qtvit"):
        model = timm.create_model("qtvit_1", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    expected = sorted(set(model.state_dict()) - set(sd))
    assert len(expected) == 7 * 7 and all(QT_SUFFIX.search(k) for k in expected)  # 7 attention blocks
    records = [r.getMessage() for r in caplog.records if "QT-ViT parameters" in r.getMessage()]
    assert len(records) == 1
    assert sorted(records[0].split(": ", 1)[1].split(", ")) == expected
    _, new = efficientvit_to_qtvit(sd, model)
    assert sorted(new) == expected
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    for k in expected:
        if k.endswith("positional_encoding"):
            assert not loaded[k].any()
        elif k.endswith("constant"):
            assert loaded[k].item() == 1.0


def test_official_efficientvit_checkpoint_and_missing_keys():
    model = timm.create_model("qtvit_4", **SMALL_L_ARGS)
    official = random_official_state_dict(SMALL_L, 4)
    dropped = [k for k in official if re.search(r"\.(positional_encoding|ones_scale1|bn\.\w+)$", k)]
    efficientvit = {k: v for k, v in official.items() if k not in dropped}
    out, new = efficientvit_to_qtvit({"state_dict": efficientvit}, model)
    assert len(new) == len(dropped) == 2 * 7
    assert sorted(new) == sorted(convert_official_keys({k: official[k] for k in dropped}))
    model.load_state_dict(out)
    del efficientvit["backbone.stages.4.op_list.1.local_module.main.point_conv.conv.weight"]
    with pytest.raises(ValueError, match=r"missing keys stages\.3\.blocks\.1\.local_module\.main\.point_conv"):
        checkpoint_filter_fn(efficientvit, model)


# ------------------------------------------------------------------------------ loaded checkpoint + timm API
def test_features_only_and_num_classes_on_loaded_checkpoint(qtvit_1_file):
    sd, path = qtvit_1_file
    full = timm.create_model("qtvit_1", pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    feats = timm.create_model("qtvit_1", pretrained=True, pretrained_cfg_overlay=dict(file=path),
                              features_only=True, out_indices=(1, 3)).eval()
    assert feats.feature_info.reduction() == [8, 32] and feats.feature_info.channels() == [64, 256]
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        outs = feats(x)
        ref = full.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert [o.shape for o in outs] == [(1, 64, 8, 12), (1, 256, 2, 3)]
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b)
    ten = timm.create_model("qtvit_1", pretrained=True, pretrained_cfg_overlay=dict(file=path), num_classes=10)
    own = ten.state_dict()
    assert torch.equal(own["head.classifier.0.weight"], sd["head.op_list.2.linear.weight"])
    assert own["head.classifier.4.weight"].shape == (10, 1600)
    assert ten.eval()(x).shape == (1, 10)


@pytest.mark.parametrize("name,kwargs", [("qtvit_1", {}), ("qtvit_4", SMALL_L_ARGS)])
def test_forward_backward_small_and_non_square(name, kwargs):
    model = timm.create_model(name, **{**kwargs, "num_classes": 7})
    for size in [(64, 64), (64, 96)]:
        out = model(torch.randn(2, 3, *size))
        assert out.shape == (2, 7) and torch.isfinite(out).all()
        model.zero_grad()
        out.square().mean().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"parameters without gradient: {missing[:5]}"


def test_non_square_generalises_the_official_value_residual(qtvit_1_file):
    sd, path = qtvit_1_file
    model = timm.create_model("qtvit_1", pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    x = torch.randn(1, 3, 96, 160)  # 6x10 and 3x5 token grids
    with pytest.raises(ValueError, match="square token grid"):
        official_forward(x, sd, CONFIGS["qtvit_1"])  # where the official code fails
    with torch.no_grad():
        out = model(x)
    assert _rel_err(out, official_forward(x, sd, CONFIGS["qtvit_1"], square_only=False)) <= 1e-4


def test_timm_api_conformance():
    model = timm.create_model("qtvit_1").eval()
    x = torch.randn(1, 3, 64, 64)
    cfg = model.pretrained_cfg
    assert model.num_classes == cfg["num_classes"] == 1000
    sd = model.state_dict()
    assert cfg["classifier"] + ".weight" in sd and cfg["first_conv"] + ".weight" in sd
    assert model.no_weight_decay() == set()
    with torch.no_grad():
        feat = model.forward_features(x)
        assert feat.shape == (1, 256, 2, 2)
        pre = model.forward_head(feat, pre_logits=True)
        assert pre.shape == (1, model.head_hidden_size) == (1, 1600)
        torch.testing.assert_close(model(x), model.forward_head(feat))
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, feat)
        assert [t.shape[1] for t in inter] == [f["num_chs"] for f in model.feature_info] == [32, 64, 128, 256]
        assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
        early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[1], inter[1])
    assert model.get_classifier() is model.head.classifier[-1]
    assert set(model.group_matcher()) == {"stem", "blocks"}
    create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)  # uses group_matcher
    model.reset_classifier(5)
    with torch.no_grad():
        assert model(x).shape == (1, 5)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (1, 1600)
    for bad in (torch.randn(3, 64, 64), torch.randn(1, 4, 64, 64)):
        with pytest.raises(ValueError, match=r"expected an image batch of shape \(B, 3, H, W\)"):
            model(bad)
        with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
            model.forward_intermediates(bad)


def test_grad_checkpointing_same_result():
    model = timm.create_model("qtvit_4", **SMALL_L_ARGS).eval()
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    ref = model(x)
    model.set_grad_checkpointing(True)
    model.train()
    for m in model.modules():  # fixed BN statistics, so both passes compute the same function
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    out = model(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bf16_autocast_keeps_attention_in_fp32():
    model = timm.create_model("qtvit_4", **SMALL_L_ARGS).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 64, 64) * 3)
    assert torch.isfinite(out).all()


def test_pretrained_cfgs():
    expected = [f"qtvit_{i}.in1k" for i in (1, 2, 3, 5, 6)] + ["qtvit_4.untrained"]
    assert timm.list_models("qtvit_*", include_tags=True) == sorted(expected)
    for i in (1, 2, 3, 5, 6):
        cfg = timm.models.get_pretrained_cfg(f"qtvit_{i}.in1k").to_dict()
        assert cfg["interpolation"] == "bicubic" and cfg["input_size"] == (3, 224, 224)
        assert cfg["crop_pct"] == (0.95 if i == 1 else 1.0)
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
        assert cfg["license"] == "apache-2.0" and "AMD_QTViT" in cfg["origin_url"]
        assert "drive.google.com/file/d/" in cfg["notes"][0]
    assert "notes" not in timm.models.get_pretrained_cfg("qtvit_4.untrained").to_dict()
