"""InfViT (infvit_linear_4l, infvit_pure_4l, infvit_pure_24l): InfSA math, ρ, sizes, large inputs, timm API.

The attention is checked in float64 against the explicit formulas written out here (the N×N
operator for the pure form; the pooled query q̄, key scores a and pooled value g broadcast to every
token for the linear form), both inside one attention layer and through a whole small model.
"""
import math

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import linvision  # noqa: F401  (registers the models)
from linvision.backbones.infvit import InfSAAttention, checkpoint_filter_fn
from vit_api_checks import check_vit_api

NAMES = ["infvit_linear_4l", "infvit_pure_4l", "infvit_pure_24l"]
EPS = 1e-6


def explicit_pure(q, k, v, rho):
    """(B, h, N, d) → (B, h, N, d): Â = ρ·ReLU(qkᵀ/d)/(‖·‖_F + eps), out = Â v."""
    d = q.shape[-1]
    s = F.relu(q @ k.transpose(-1, -2) / d)                                     # (B, h, N, N)
    frob = s.square().sum(dim=(-2, -1), keepdim=True).sqrt()
    return (rho * s / (frob + EPS)) @ v


def explicit_linear(q, k, v, rho):
    """(B, h, N, d) → (B, h, N, d): every token gets g = ρ Σ_j a_j v_j / (Σ_j a_j + eps)."""
    d = q.shape[-1]
    qs, ks = q / math.sqrt(d), k / math.sqrt(d)
    energy = qs.norm(dim=-1)                                                     # (B, h, N)
    alpha = energy / (energy.sum(-1, keepdim=True) + EPS)
    q_bar = torch.einsum("bhn,bhnd->bhd", alpha, qs)                             # pooled query
    a = F.relu(torch.einsum("bhd,bhnd->bhn", q_bar, ks))                         # key scores
    g = rho * torch.einsum("bhn,bhnd->bhd", a, v) / (a.sum(-1)[..., None] + EPS)  # pooled value
    return g[:, :, None, :].expand_as(v)


def explicit_attention(attn, x):
    """One InfSA attention layer from its weights: x (B, N, C) → (B, N, C)."""
    b, n, c = x.shape
    h = attn.num_heads
    split = lambda t: t.reshape(b, n, h, c // h).transpose(1, 2)  # noqa: E731
    rho = torch.sigmoid(attn.mixer.rho_logit)
    if attn.form == "pure":
        q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).split(c, dim=-1)
        y = explicit_pure(split(q), split(k), split(v), rho)
    else:
        k, v = F.linear(x, attn.kv.weight, attn.kv.bias).split(c, dim=-1)
        y = explicit_linear(split(x), split(k), split(v), rho)  # the token is its own query
    return F.linear(y.transpose(1, 2).reshape(b, n, c), attn.proj.weight, attn.proj.bias)


def explicit_model(model, img):
    """A whole InfViT (eval) from its weights with the explicit attention."""
    t = F.conv2d(img, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=16)
    b, c, gh, gw = t.shape
    # The host's own table resampling (timm's) for grids other than the build size.
    pos = resample_abs_pos_embed(model.pos_embed, new_size=(gh, gw), num_prefix_tokens=1)
    t = torch.cat([model.cls_token.expand(b, -1, -1), t.flatten(2).transpose(1, 2)], dim=1) + pos
    ln = lambda z, m: F.layer_norm(z, (c,), m.weight, m.bias, eps=1e-6)  # noqa: E731
    for blk in model.blocks:
        t = t + explicit_attention(blk.attn, ln(t, blk.norm1))
        t = t + F.linear(F.gelu(F.linear(ln(t, blk.norm2), blk.mlp.fc1.weight, blk.mlp.fc1.bias)),
                         blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    cls = ln(t, model.norm)[:, 0]
    cls = torch.tanh(F.linear(cls, model.pre_logits.fc.weight, model.pre_logits.fc.bias))
    return F.linear(cls, model.head.weight, model.head.bias)


@pytest.mark.parametrize("form", ["pure", "linear"])
def test_attention_matches_the_explicit_formulas_fp64(form):
    attn = InfSAAttention(24, 3, form=form, rho_init=0.8).double()
    x = torch.randn(2, 1 + 3 * 4, 24, dtype=torch.float64)
    got = attn(x, hw=(3, 4))
    torch.testing.assert_close(got, explicit_attention(attn, x), rtol=1e-12, atol=1e-12)
    if form == "linear":  # one pooled vector per (sample, head), projected: equal for all tokens
        torch.testing.assert_close(got, got[:, :1].expand_as(got), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["infvit_pure_4l", "infvit_linear_4l"])
def test_whole_model_matches_the_explicit_formulas_fp64(name):
    model = timm.create_model(name, embed_dim=32, num_heads=4, img_size=64).double().eval()
    for blk in model.blocks:  # distinct ρ per block so that each block's own ρ is the one used
        blk.attn.mixer.rho_logit.data.uniform_(-1.0, 2.0)
    for img in (torch.randn(2, 3, 64, 64, dtype=torch.float64), torch.randn(1, 3, 64, 96, dtype=torch.float64)):
        with torch.no_grad():
            torch.testing.assert_close(model(img), explicit_model(model, img), rtol=1e-10, atol=1e-10)


def test_rho_is_trained():
    model = timm.create_model("infvit_linear_4l", embed_dim=32, num_heads=4)
    rho = model.blocks[0].attn.mixer.rho_logit
    assert rho.requires_grad
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    assert rho.grad is not None and rho.grad.abs() > 0
    for form in ("pure", "linear"):  # ρ scales the attention output, through the graph
        attn = InfSAAttention(16, 2, form=form).double()
        x = torch.randn(1, 5, 16, dtype=torch.float64)
        y = attn(x, hw=(2, 2))
        with torch.no_grad():
            attn.mixer.rho_logit.add_(0.5)
        assert not torch.allclose(attn(x, hw=(2, 2)), y)
        attn(x, hw=(2, 2)).sum().backward()
        assert attn.mixer.rho_logit.grad is not None and attn.mixer.rho_logit.grad != 0


def _expected_params(depth: int, form: str, e: int = 1024, hidden: int = 4608, classes: int = 1000) -> int:
    """The reconstructed InfViT's parameter count, from its layer shapes."""
    projections = 4 if form == "pure" else 3                                     # the linear form has no W_q
    block = 2 * e + projections * (e * e + e) + 1 + 2 * e + (e * hidden + hidden) + (hidden * e + e)
    embed = 3 * 16 * 16 * e + e + e + 197 * e                                    # patch conv, cls, pos_embed
    return embed + depth * block + 2 * e + (e * e + e) + e * classes + classes   # norm, pre-logits, head


@pytest.mark.parametrize("name, depth, form, paper", [
    ("infvit_linear_4l", 4, "linear", 53.5), ("infvit_pure_4l", 4, "pure", 57.7), ("infvit_pure_24l", 24, "pure", 330.6),
])
def test_parameter_counts(name, depth, form, paper):
    with torch.device("meta"):
        model = timm.create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == _expected_params(depth, form)
    assert abs(n / 1e6 - paper) < 0.06  # the reconstruction lands within 0.06M of the paper's figure
    assert len(model.blocks) == depth and model.blocks[0].attn.form == form
    # The pure − linear gap is one E×E + E projection per block, as in the paper.
    assert _expected_params(4, "pure") - _expected_params(4, "linear") == 4 * (1024 * 1024 + 1024)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest_tensor(name: str, side: int) -> int:
    """Largest intermediate of a real-size model's forward at ``side``² without computing anything
    (fake tensors carry shapes only; the parameters are allocated, not initialised)."""
    with torch.device("meta"):
        model = timm.create_model(name).eval()
    model = model.to_empty(device="cpu")
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(1, 3, side, side)
        with torch.no_grad(), _LargestTensor() as probe:
            assert model(x).shape == (1, 1000)
    return probe.largest


def test_linear_infvit_has_nothing_quadratic_at_9216():
    n = (9216 // 16) ** 2 + 1  # 331,777 tokens, the paper's headline inference size
    largest = _largest_tensor("infvit_linear_4l", 9216)
    assert largest == n * 4608  # the MLP hidden activation: O(N·C), nowhere near N² = 1.1e11
    # The probe does see quadratic memory where there is some: the pure form's (1, 16, N, N).
    n_pure = (512 // 16) ** 2 + 1
    assert _largest_tensor("infvit_pure_4l", 512) == 16 * n_pure * n_pure


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_every_name(name):
    overrides = dict(embed_dim=64, num_heads=4) if name == "infvit_pure_24l" else {}
    model = timm.create_model(name, num_classes=5, **overrides)
    model.set_grad_checkpointing(name == "infvit_pure_4l")
    x = torch.randn(2, 3, 32, 48, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 5)
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for blk in (model.blocks[0], model.blocks[-1]):
        assert blk.attn.mixer.rho_logit.grad is not None and torch.isfinite(blk.attn.mixer.rho_logit.grad)
    assert model.pre_logits.fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_timm_api(name):
    # Narrowed to 64 channels to keep the suite fast (the real widths run in the test above).
    check_vit_api(name, torch.randn(2, 3, 32, 48), embed_dim=64, num_heads=4)


def test_own_checkpoints_load_from_containers_and_other_sizes(tmp_path):
    src = timm.create_model("infvit_linear_4l", embed_dim=32, num_heads=4, img_size=64)
    sd = src.state_dict()
    container = {"model": {"module." + k: v for k, v in sd.items()}, "optimizer": {}, "epoch": 3}
    dst = timm.create_model("infvit_linear_4l", embed_dim=32, num_heads=4, img_size=64)
    out = checkpoint_filter_fn(container, dst)
    assert out.keys() == sd.keys()
    dst.load_state_dict(out, strict=True)
    path = tmp_path / "infvit.safetensors"
    safetensors.torch.save_file(sd, str(path))
    big = timm.create_model("infvit_linear_4l", embed_dim=32, num_heads=4, img_size=96, pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(path)))
    assert big.pos_embed.shape == (1, 37, 32)
    torch.testing.assert_close(big.blocks[3].attn.mixer.rho_logit, sd["blocks.3.attn.mixer.rho_logit"])


def test_cfg_is_deit_preprocessing_without_weights():
    with torch.device("meta"):
        model = timm.create_model("infvit_linear_4l")
    cfg = model.pretrained_cfg
    assert cfg["url"] == "" and cfg["tag"] == "untrained"
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="attn_form"):
        timm.create_model("infvit_linear_4l", attn_form="softmax", embed_dim=32, num_heads=4)
    with pytest.raises(ValueError, match="attn_drop_rate"):
        timm.create_model("infvit_linear_4l", attn_drop_rate=0.1, embed_dim=32, num_heads=4)
