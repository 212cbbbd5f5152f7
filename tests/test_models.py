"""Every registered model: creation, forward/backward, any input size, the timm model API."""
import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

import linvision

ALL_MODELS = timm.list_models(["linvit_*", "mavit_*", "ravlt_*"])
TINY_MODELS = [m for m in ALL_MODELS if "_t" in m]

EXACT_PARAMS = {  # measured on the official classes
    "mavit_t": 16_449_128, "mavit_s": 27_142_568, "mavit_b": 49_792_648, "mavit_l": 97_766_088,
    "ravlt_t": 14_897_768, "ravlt_s": 25_591_208, "ravlt_b": 48_241_288, "ravlt_l": 95_242_440,
}


def test_registry_has_every_family():
    for name in ["linvit_t", "linvit_s", "linvit_b", "linvit_l", "linvit_b_rala", *EXACT_PARAMS]:
        assert name in ALL_MODELS


@pytest.mark.parametrize("name", list(EXACT_PARAMS))
def test_parameter_counts_match_official(name):
    model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == EXACT_PARAMS[name]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward_square_and_non_square(name):
    model = timm.create_model(name, num_classes=7, drop_path_rate=0.1)
    for size in [(64, 64), (48, 80)]:
        x = torch.randn(2, 3, *size)
        out = model(x)
        assert out.shape == (2, 7) and torch.isfinite(out).all()
        model.zero_grad()
        out.square().mean().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"parameters without gradient: {missing[:5]}"


@pytest.mark.parametrize("size", [(97, 131), (192, 320), (224, 224), (17, 9)])
def test_any_input_size(size):
    model = timm.create_model("linvit_t", num_classes=3).eval()
    with torch.no_grad():
        feats = model.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
    h, w = size
    for f, r in zip(feats, (4, 8, 16, 32)):
        assert f.shape[-2:] == (-(-h // r), -(-w // r))  # ceil(size / stride)


@pytest.mark.parametrize("bad", [torch.randn(3, 64, 64), torch.randn(1, 1, 64, 64), torch.randn(1, 4, 32, 32)])
def test_bad_input_is_a_value_error(bad):
    model = timm.create_model("linvit_t")
    with pytest.raises(ValueError, match=r"expected an image batch of shape \(B, 3, H, W\)"):
        model(bad)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.forward_intermediates(bad)


def test_unknown_constructor_argument_is_a_type_error():
    with pytest.raises(TypeError):
        timm.create_model("linvit_t", not_an_arg=1)
    with pytest.raises(ValueError, match="attn must be one of"):
        timm.create_model("linvit_t", attn="nope")


def _check_timm_api(model, x):
    model.eval()
    cfg = model.pretrained_cfg
    assert model.num_classes == cfg["num_classes"] == 1000
    assert model.num_features > 0 and model.head_hidden_size > 0
    sd = model.state_dict()
    assert cfg["classifier"] + ".weight" in sd and cfg["first_conv"] + ".weight" in sd
    assert isinstance(model.no_weight_decay(), set)
    with torch.no_grad():
        feat = model.forward_features(x)
        assert feat.shape == (x.shape[0], model.num_features, 2, 2)
        pre = model.forward_head(feat, pre_logits=True)
        assert pre.shape == (x.shape[0], model.head_hidden_size)
        torch.testing.assert_close(model(x), model.forward_head(feat))
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, feat)
        assert [t.shape[1] for t in inter] == [f["num_chs"] for f in model.feature_info]
        assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(last2[-1], inter[-1])
        assert len(last2) == 2
        early = model.forward_intermediates(x, indices=[0, -3], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[1], inter[1])
    assert model.get_classifier() is model.head
    groups = model.group_matcher()
    assert set(groups) == {"stem", "blocks"}
    create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)  # uses group_matcher
    model.reset_classifier(5)
    with torch.no_grad():
        assert model(x).shape == (x.shape[0], 5)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (x.shape[0], model.num_features)
    model.reset_classifier(0, "")
    with torch.no_grad():
        assert model(x).dim() == 4


@pytest.mark.parametrize("name", ALL_MODELS)
def test_timm_api_conformance(name):
    _check_timm_api(timm.create_model(name), torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("name", TINY_MODELS)
def test_features_only_out_indices_and_overrides(name):
    feats = timm.create_model(name, features_only=True, out_indices=(1, 3), in_chans=1)
    assert feats.feature_info.reduction() == [8, 32]
    outs = feats(torch.randn(2, 1, 64, 96))
    assert [o.shape[1] for o in outs] == feats.feature_info.channels()
    assert [o.shape[-2:] for o in outs] == [(8, 12), (2, 3)]
    full = timm.create_model(name, features_only=True)
    assert full.feature_info.reduction() == [4, 8, 16, 32]


@pytest.mark.parametrize("name", TINY_MODELS)
def test_grad_checkpointing_same_result(name):
    model = timm.create_model(name, num_classes=4, drop_path_rate=0.0).eval()
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    ref = model(x)
    model.set_grad_checkpointing(True)
    model.train()
    for m in model.modules():  # keep BN statistics fixed so both passes compute the same function
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    out = model(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_attn_and_softmax_stages_arguments():
    model = timm.create_model("linvit_t", attn="rala", softmax_stages=(3,))
    kinds = [type(s.blocks[0].attn.mixer).__name__ for s in model.stages]
    assert kinds == ["RankAugmentedLinearAttention"] * 3 + ["SoftmaxAttention"]
    mavit = timm.create_model("mavit_t")
    kinds = [type(s.blocks[0].attn.mixer).__name__ for s in mavit.stages]
    assert kinds == ["MagnitudeAwareLinearAttention"] * 2 + ["SoftmaxAttention"] * 2


BF16_U = 2.0 ** -8  # bf16 unit roundoff


def test_bf16_autocast_forward_within_bf16_rounding_of_fp32():
    """A 12-block model under bf16 autocast stays within a few bf16 roundings (relative, whole logits) of fp32."""
    model = timm.create_model("linvit_t").eval()
    x = torch.randn(1, 3, 128, 128) * 3
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 4 * BF16_U


MECHANISMS = sorted(set(linvision.attn.MIXERS) - {"softmax"})


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_every_mechanism_at_a_1024x1024_grid_in_bf16_within_rounding_of_fp32(mechanism):
    from linvision.attn import RopeGrid, create_mixer, rope_angle
    hw, d = (1024, 1024), 16
    mixer = create_mixer(mechanism, d, 1)
    q, k, v = (torch.randn(1, 1, hw[0] * hw[1], d).mul(4).bfloat16() for _ in range(3))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mixer(q, k, v, hw=hw, rope=RopeGrid(rope_angle(d), *hw))
        ref = mixer(q.float(), k.float(), v.float(), hw=hw, rope=RopeGrid(rope_angle(d), *hw))
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    # The same bf16 inputs in fp32: the bf16 run may differ by its output rounding and the mixers' own bf16
    # projections, not by an overflow or a lost normaliser (NaN fails the comparison).
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2 * BF16_U


# Whole models at 1024×1024 in bf16 on CUDA, against fp32: tests/test_model_backends.py.
