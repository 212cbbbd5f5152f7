"""Mechanism modules: focused (FLatten), InLine, QT-ViT Taylor, MirrorLA, InfSA.

Each linear form is checked against an explicit N×N form and/or a literal transcription of the
official code (fp64, tight tolerance), with gradcheck, invariances, bf16-autocast finiteness at
N = 1024 and shape errors.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from linvision.attn import MIXERS, create_mixer
from linvision.attn.focused import FocusedLinearAttention
from linvision.attn.infsa import InfiniteSelfAttention
from linvision.attn.inline import InjectiveLinearAttention
from linvision.attn.mirror import MirrorLinearAttention, householder
from linvision.attn.ops.naive import quadratic_attention
from linvision.attn.qt_taylor import QuadraticTaylorAttention, quadratic_taylor_feature_map

NAMES = ["focused", "inline", "qt", "mirror", "infsa"]
TIGHT = dict(rtol=1e-10, atol=1e-10)


def qkv(b, h, n, d, dtype=torch.float64, scale=1.0, grad=False):
    return tuple((torch.randn(b, h, n, d, dtype=dtype) * scale).requires_grad_(grad) for _ in range(3))


def randomize_(module, std=0.5):
    """Non-trivial values for every parameter (zero-init tables, scales, gains...)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * std)
    return module


def merge(t):
    """(B, h, N, d) → (B, N, h·d)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def split(t, h):
    """(B, N, C) → (B, h, N, C/h)."""
    b, n, c = t.shape
    return t.reshape(b, n, h, c // h).transpose(1, 2)


def gradcheck_mixer(mixer, q, k, v, **kwargs):
    """gradcheck over q, k, v and every trainable parameter of ``mixer`` (fp64)."""
    names = [n for n, p in mixer.named_parameters() if p.requires_grad]
    params = [p.detach().clone().requires_grad_() for n, p in mixer.named_parameters() if p.requires_grad]
    buffers = dict(mixer.named_buffers())

    def fn(q_, k_, v_, *ps):
        return functional_call(mixer, {**dict(zip(names, ps)), **buffers}, (q_, k_, v_), kwargs)

    inputs = tuple(t.detach().requires_grad_() for t in (q, k, v)) + tuple(params)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# registry, interface, shapes, bf16
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_registered_and_default_forward_backward(name):
    assert name in MIXERS
    mixer = create_mixer(name, 32, 2)
    assert mixer.uses_rope is False
    q, k, v = qkv(2, 2, 15, 16, dtype=torch.float32, grad=True)
    out = mixer(q, k, v, hw=(3, 5))                       # non-square grid
    assert out.shape == (2, 2, 15, 16) and out.dtype == torch.float32
    out.square().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    for pname, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", NAMES)
def test_shape_errors(name):
    mixer = create_mixer(name, 32, 2)
    q, k, v = qkv(1, 2, 12, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="4-D"):
        mixer(q[0], k[0], v[0], hw=(3, 4))
    with pytest.raises(ValueError, match="heads|shape"):
        mixer(*qkv(1, 4, 12, 8, dtype=torch.float32), hw=(3, 4))        # right C, wrong head split
    with pytest.raises(ValueError, match=r"\(B, 2, N, 16\)"):
        mixer(q[..., :8], k[..., :8], v[..., :8], hw=(3, 4))
    with pytest.raises(ValueError, match="H\\*W"):
        mixer(q, k, v, hw=(4, 4))
    with pytest.raises(ValueError, match="same shape"):
        mixer(q, k[:, :, :6], v, hw=(3, 4))
    with pytest.raises(ValueError, match="divisible"):
        create_mixer(name, 30, 4)


BF16_CASES = [("focused", {}), ("focused", {"positional_encoding_size": 7}), ("inline", {}), ("qt", {}),
              ("qt", {"positional_encoding_size": 7}), ("mirror", {"block_size": 4}), ("infsa", {}),
              ("infsa", {"form": "pure"})]


@pytest.mark.parametrize("name,kwargs", BF16_CASES)
def test_bf16_autocast_large_inputs_stay_finite(name, kwargs):
    mixer = randomize_(create_mixer(name, 32, 2, **kwargs))
    q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in qkv(1, 2, 1024, 16, dtype=torch.float32, scale=1e6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mixer(q, k, v, hw=(32, 32))
    assert out.dtype == torch.bfloat16 and out.shape == v.shape
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


# ----------------------------------------------------------------------------------------------
# focused (FLatten)
# ----------------------------------------------------------------------------------------------

def official_focused(mixer, q, k, v, hw, form="head"):
    """Literal transcription of the official FocusedLinearAttention forward, fp64.

    ``form="head"``: the 2024 code (means, z = 1/(q·k̄ + 1e-6)); ``"2023"``: sums, written as the
    explicit N×N matrix ``A = φq φkᵀ / (φq·Σφk + 1e-6)``.
    """
    h, p = mixer.num_heads, mixer.focusing_power
    qc, kc = merge(q), merge(k)                                        # (B, N, C)
    b, n, c = qc.shape
    if mixer.positional_encoding is not None:
        kc = kc + mixer.positional_encoding
    scale = F.softplus(mixer.scale)
    qc, kc = (F.relu(qc) + 1e-6) / scale, (F.relu(kc) + 1e-6) / scale
    qn, kn = qc.norm(dim=-1, keepdim=True), kc.norm(dim=-1, keepdim=True)
    qc, kc = qc ** p, kc ** p
    qc, kc = qc / qc.norm(dim=-1, keepdim=True) * qn, kc / kc.norm(dim=-1, keepdim=True) * kn
    qh, kh = split(qc, h), split(kc, h)
    if form == "head":
        z = 1 / (qh @ kh.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
        kv = (kh.transpose(-2, -1) * n ** -0.5) @ (v * n ** -0.5)
        x = qh @ kv * z
    else:
        attn = (qh @ kh.transpose(-2, -1)) / (qh @ kh.sum(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
        x = attn @ v
    v_img = v.reshape(b * h, hw[0], hw[1], -1).permute(0, 3, 1, 2)
    x = merge(x) + mixer.dwc(v_img).reshape(b, c, n).permute(0, 2, 1)
    return split(x, h)


@pytest.mark.parametrize("power", [3.0, 2.5, 8.0])
def test_focused_matches_official_head_form(power):
    hw = (3, 4)
    mixer = randomize_(FocusedLinearAttention(16, 2, focusing_power=power, positional_encoding_size=hw)).double()
    q, k, v = qkv(2, 2, 12, 8)
    torch.testing.assert_close(mixer(q, k, v, hw=hw), official_focused(mixer, q, k, v, hw), **TIGHT)


def test_focused_sum_form_matches_2023_quadratic_and_differs_from_head_where_eps_matters():
    hw = (3, 3)
    head = randomize_(FocusedLinearAttention(8, 2, positional_encoding_size=hw)).double()
    old = FocusedLinearAttention(8, 2, positional_encoding_size=hw, normalizer_form="sum").double()
    old.load_state_dict(head.state_dict())
    # ordinary magnitudes: the two forms agree to ~eps (both reproduce the released checkpoints)
    q, k, v = qkv(1, 2, 9, 4)
    torch.testing.assert_close(old(q, k, v, hw=hw), official_focused(old, q, k, v, hw, form="2023"), **TIGHT)
    torch.testing.assert_close(old(q, k, v, hw=hw), head(q, k, v, hw=hw), rtol=1e-4, atol=1e-5)
    # tiny features (q·k̄ ~ eps): each form still matches its own official code, and they differ
    with torch.no_grad():
        head.scale.fill_(8.0)
        old.scale.fill_(8.0)
        head.positional_encoding.zero_()
        old.positional_encoding.zero_()
    q, k = q * 1e-3, k * 1e-3
    out_head, out_old = head(q, k, v, hw=hw), old(q, k, v, hw=hw)
    torch.testing.assert_close(out_head, official_focused(head, q, k, v, hw), **TIGHT)
    torch.testing.assert_close(out_old, official_focused(old, q, k, v, hw, form="2023"), **TIGHT)
    assert (out_head - out_old).abs().max() > 1e-3


def test_focused_norm_spans_all_heads():
    """Changing head 1 of q changes head 0's features (‖·‖ over all C channels, as the official code does)."""
    mixer = FocusedLinearAttention(8, 2).double()
    q, k, v = qkv(1, 2, 4, 4)
    out = mixer(q, k, v, hw=(2, 2))
    q2 = q.clone()
    q2[:, 1] *= 3.0
    assert not torch.allclose(mixer(q2, k, v, hw=(2, 2))[:, 0], out[:, 0])


def test_focused_positional_encoding_resized_bicubically():
    mixer = randomize_(FocusedLinearAttention(8, 2, positional_encoding_size=(3, 4))).double()
    table = mixer.positional_encoding.transpose(1, 2).reshape(1, 8, 3, 4)
    torch.testing.assert_close(merge(mixer.key_positional_encoding((3, 4))), mixer.positional_encoding, **TIGHT)
    want = F.interpolate(table, size=(5, 2), mode="bicubic", align_corners=False).reshape(1, 8, 10).transpose(1, 2)
    torch.testing.assert_close(merge(mixer.key_positional_encoding((5, 2))), want, **TIGHT)
    q, k, v = qkv(1, 2, 10, 4)
    assert torch.isfinite(mixer(q, k, v, hw=(5, 2))).all()


def test_focused_gradcheck():
    mixer = randomize_(FocusedLinearAttention(4, 2, kernel_size=3, positional_encoding_size=(2, 2))).double()
    gradcheck_mixer(mixer, *qkv(1, 2, 4, 2), hw=(2, 2))


# ----------------------------------------------------------------------------------------------
# InLine
# ----------------------------------------------------------------------------------------------

def inline_weights(q, k):
    """Explicit w_ij = (s_ij − mean_t s_it)/N + 1/N, s = d^-½ q·k."""
    n, d = q.shape[2], q.shape[3]
    s = (q @ k.transpose(-1, -2)) * d ** -0.5
    return (s - s.mean(dim=-1, keepdim=True)) / n + 1.0 / n


def test_inline_matches_explicit_weights_rows_sum_to_one():
    mixer = InjectiveLinearAttention(16, 2, local_residual=False).double()
    q, k, v = qkv(2, 2, 12, 8, scale=3.0)
    w = inline_weights(q, k)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), **TIGHT)
    assert (w < 0).any()                                               # negative weights are kept
    torch.testing.assert_close(mixer(q, k, v, hw=(3, 4)), w @ v, **TIGHT)
    const = torch.full_like(v, 2.5)                                    # rows sum to 1 through the mixer
    torch.testing.assert_close(mixer(q, k, const, hw=(3, 4)), const, **TIGHT)


def official_inline_deit(mixer, x, q, k, v):
    """Literal transcription of the official InLine-DeiT attention after qkv (with cls), fp64."""
    b, n, c = x.shape
    h = w = int(n ** 0.5)
    scale = mixer.scale
    res_weight = mixer.residual(x.mean(dim=1).unsqueeze(dim=-1)).reshape(b * c, 1, 3, 3)
    kv = (k.transpose(-2, -1) * (scale / n) ** 0.5) @ (v * (scale / n) ** 0.5)
    out = q @ kv + (1 - q @ k.mean(dim=2, keepdim=True).transpose(-2, -1) * scale) * v.mean(dim=2, keepdim=True)
    out = out.transpose(1, 2).reshape(b, n, c)
    v_ = v[:, :, 1:, :].transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2).reshape(1, b * c, h, w)
    residual = F.conv2d(v_, res_weight, None, padding=(1, 1), groups=b * c)
    out = out.clone()
    out[:, 1:, :] = out[:, 1:, :] + residual.reshape(b, c, n - 1).permute(0, 2, 1)
    return split(out, mixer.num_heads)


def test_inline_matches_official_deit_with_cls_token():
    mixer = randomize_(InjectiveLinearAttention(16, 2, num_prefix_tokens=1)).double()
    x = torch.randn(2, 10, 16, dtype=torch.float64)                   # attention input: cls + 3×3
    q, k, v = qkv(2, 2, 10, 8)
    out = mixer(q, k, v, hw=(3, 3), token_mean=x.mean(dim=1))
    torch.testing.assert_close(out, official_inline_deit(mixer, x, q, k, v), **TIGHT)
    plain = InjectiveLinearAttention(16, 2, num_prefix_tokens=1, local_residual=False).double()
    torch.testing.assert_close(out[:, :, :1], plain(q, k, v, hw=(3, 3))[:, :, :1], **TIGHT)  # cls: no local term


def test_inline_default_token_mean_is_value_mean():
    mixer = randomize_(InjectiveLinearAttention(16, 2)).double()
    q, k, v = qkv(1, 2, 6, 8)
    torch.testing.assert_close(mixer(q, k, v, hw=(2, 3)), mixer(q, k, v, hw=(2, 3), token_mean=merge(v).mean(1)),
                               **TIGHT)
    with pytest.raises(ValueError, match="token_mean"):
        mixer(q, k, v, hw=(2, 3), token_mean=torch.zeros(1, 8, dtype=torch.float64))


def test_inline_gradcheck():
    mixer = randomize_(InjectiveLinearAttention(4, 2, num_prefix_tokens=1)).double()
    gradcheck_mixer(mixer, *qkv(2, 2, 5, 2), hw=(2, 2))


# ----------------------------------------------------------------------------------------------
# QT-ViT quadratic Taylor
# ----------------------------------------------------------------------------------------------

def official_qt(mixer, q, k, v, hw):
    """Literal transcription of AMD_QTViT ``LiteMLA.relu_linear_att`` after the qkv split, fp64."""
    eps, (hh, ww) = mixer.eps, hw
    b, heads, n, d = q.shape
    pe = mixer.positional_encoding
    if (hh, ww) != tuple(pe.shape[2:]):
        pe = F.interpolate(pe, size=(hh, ww), mode="bicubic")
    k = k + pe.reshape(-1, heads, d, hh * ww).transpose(-1, -2)
    q = q / (q.norm(dim=-1, keepdim=True) + eps)
    k = k / (k.norm(dim=-1, keepdim=True) + eps)
    q, k = q ** 2, k ** 2
    q = q / (q.norm(dim=-1, keepdim=True) + eps)
    k = k / (k.norm(dim=-1, keepdim=True) + eps)
    ones1 = torch.ones(b, heads, n, 1, dtype=q.dtype) * mixer.constant
    q, k = torch.cat((q, ones1), dim=-1), torch.cat((k, ones1), dim=-1)
    v1 = F.pad(v, (0, 1), mode="constant", value=1)
    out = q @ (k.transpose(-1, -2) @ v1)
    out = out[..., :-1] / (out[..., -1:] + eps)
    bn = torch.nn.functional.batch_norm(v.reshape(b * heads, n, d).transpose(1, 2), None, None,
                                        mixer.bn.weight, mixer.bn.bias, training=True, eps=mixer.bn.eps)
    return out + F.gelu(bn).transpose(1, 2).reshape(b, heads, n, d)


@pytest.mark.parametrize("hw", [(3, 3), (4, 5)])
def test_qt_matches_official(hw):
    mixer = randomize_(QuadraticTaylorAttention(16, 2, positional_encoding_size=3)).double()
    q, k, v = qkv(2, 2, hw[0] * hw[1], 8)
    torch.testing.assert_close(mixer(q, k, v, hw=hw), official_qt(mixer, q, k, v, hw), **TIGHT)


def test_qt_kernel_is_diagonal_taylor_plus_constant_and_matches_quadratic_form():
    mixer = randomize_(QuadraticTaylorAttention(16, 2, value_residual=False)).double()
    q, k, v = qkv(1, 2, 12, 8)
    s = mixer.constant
    q2, k2 = q ** 2, k ** 2
    kappa = (q2 / q2.norm(dim=-1, keepdim=True)) @ (k2 / k2.norm(dim=-1, keepdim=True)).transpose(-1, -2) + s ** 2
    phi_q = quadratic_taylor_feature_map(q, s)
    phi_k = quadratic_taylor_feature_map(k, s)
    torch.testing.assert_close(phi_q @ phi_k.transpose(-1, -2), kappa, **TIGHT)
    want = (kappa @ v) / (kappa.sum(-1, keepdim=True) + 1e-15)
    torch.testing.assert_close(mixer(q, k, v, hw=(3, 4)), want, **TIGHT)


def test_qt_eps_and_first_normalisation():
    """Official ε = 1e-15; the first normalisation only guards inf/NaN: φ is scale-invariant."""
    mixer = randomize_(QuadraticTaylorAttention(16, 2)).double()
    assert mixer.eps == 1e-15
    q, k, v = qkv(1, 2, 9, 8)
    for c in (1e-4, 1e4):
        torch.testing.assert_close(quadratic_taylor_feature_map(q * c, mixer.constant),
                                   quadratic_taylor_feature_map(q, mixer.constant), **TIGHT)
    # fp32 inputs of magnitude 1e15 would overflow q⁴ without the first normalisation
    big = quadratic_taylor_feature_map(q.float() * 1e15, mixer.constant.float())
    assert torch.isfinite(big).all()


def test_qt_gradcheck():
    mixer = randomize_(QuadraticTaylorAttention(4, 2, positional_encoding_size=2)).double()
    gradcheck_mixer(mixer, *qkv(2, 2, 6, 2), hw=(2, 3))


# ----------------------------------------------------------------------------------------------
# MirrorLA
# ----------------------------------------------------------------------------------------------

def householder_matrix(u):
    u = u.reshape(-1, 1)
    return torch.eye(u.shape[0], dtype=u.dtype) - 2 * (u @ u.T) / (u.T @ u)


def test_householder_primitive_is_orthogonal_involution():
    u = torch.randn(7, dtype=torch.float64)
    x = torch.randn(5, 7, dtype=torch.float64)
    hx = householder(x, u)
    torch.testing.assert_close(hx.norm(dim=-1), x.norm(dim=-1), **TIGHT)
    torch.testing.assert_close(householder(hx, u), x, **TIGHT)
    torch.testing.assert_close(hx, x @ householder_matrix(u).T, **TIGHT)
    torch.testing.assert_close(householder(x, torch.zeros(7, dtype=torch.float64)), x, **TIGHT)


MIRROR_CASES = [dict(), dict(block_size=2), dict(cross_head_position="first", cross_head_reflections=2),
                dict(variance_modulation=False, cross_head_reflections=0)]


@pytest.mark.parametrize("kwargs", MIRROR_CASES)
def test_mirror_every_reflection_orthogonal_and_map_is_isometry(kwargs):
    mixer = randomize_(MirrorLinearAttention(16, 2, **kwargs)).double()
    q, k, v = qkv(2, 2, 12, 8)
    first, second, *cross = mixer.reflection_vectors(q, k)
    assert first.shape == second.shape == (2, 2, mixer.num_blocks, mixer.block_size)
    assert len(cross) == kwargs.get("cross_head_reflections", 1)
    for u in list(first.reshape(-1, mixer.block_size)) + list(second.reshape(-1, mixer.block_size)) + cross:
        hm = householder_matrix(u)
        eye = torch.eye(hm.shape[0], dtype=hm.dtype)
        torch.testing.assert_close(hm @ hm, eye, **TIGHT)             # H² = I
        torch.testing.assert_close(hm.T @ hm, eye, **TIGHT)           # orthogonal
        x = torch.randn(hm.shape[0], dtype=hm.dtype)
        torch.testing.assert_close(householder(x, u).norm(), x.norm(), **TIGHT)
    tq, tk = mixer.reflect(q, k)
    torch.testing.assert_close(merge(tq).norm(dim=-1), merge(q).norm(dim=-1), **TIGHT)
    torch.testing.assert_close(merge(tq) @ merge(tk).transpose(1, 2), merge(q) @ merge(k).transpose(1, 2), **TIGHT)


def test_mirror_matches_quadratic_relu_division():
    mixer = randomize_(MirrorLinearAttention(16, 2, block_size=4)).double()
    q, k, v = qkv(2, 2, 12, 8)
    tq, tk = mixer.reflect(q, k)
    want = quadratic_attention(tq, tk, v, normalization="division", feature_map="relu", eps=mixer.eps)
    torch.testing.assert_close(mixer(q, k, v, hw=(3, 4)), want, **TIGHT)


def test_mirror_block_angle_runs_from_identity_to_the_diagonal():
    mixer = MirrorLinearAttention(16, 2, block_size=4, variance_modulation=False, cross_head_reflections=0).double()
    q, k, _ = qkv(1, 2, 6, 8)
    with torch.no_grad():
        mixer.angle_bias.fill_(-60.0)                                  # λ = sigmoid(−60) ≈ 0: identity
    tq, tk = mixer.reflect(q, k)
    torch.testing.assert_close(tq, q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tk, k, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        mixer.angle_bias.fill_(60.0)                                   # λ ≈ 1: â goes onto 𝟙/√b
    src = F.normalize(mixer.block_direction, dim=-1)                  # (heads, blocks, b)
    tokens = src.reshape(1, 2, 1, 8)
    out, _ = mixer.reflect(tokens, tokens)
    torch.testing.assert_close(out, torch.full_like(out, 0.5), **TIGHT)


@pytest.mark.parametrize("kwargs", [dict(), dict(cross_head_position="first", value_conv_kernel_size=3)])
def test_mirror_gradcheck(kwargs):
    mixer = randomize_(MirrorLinearAttention(4, 2, **kwargs)).double()
    gradcheck_mixer(mixer, *qkv(1, 2, 6, 2), hw=(2, 3))


# ----------------------------------------------------------------------------------------------
# Infinite self-attention
# ----------------------------------------------------------------------------------------------

def official_infsa(q, k, v, variant, rho, eps=1e-6):
    """Literal transcription of ``infsa.core.infsa_attention`` (both variants), fp64."""
    d = q.shape[-1]
    qs, ks = q * math.sqrt(1.0 / d), k * math.sqrt(1.0 / d)
    if variant == "pure":
        a = torch.relu(qs @ ks.transpose(-2, -1))
        flat = a.flatten(-2)
        a = (flat / (torch.norm(flat, p=2, dim=-1, keepdim=True) + eps)).view(a.shape)
        return (rho * a) @ v
    energy = torch.relu(qs.norm(p=2, dim=-1))
    weights = energy / (energy.sum(dim=-1, keepdim=True) + eps)
    q_bar = torch.einsum("...n,...nd->...d", weights, qs)
    a = torch.relu(torch.einsum("...d,...nd->...n", q_bar, ks))
    a = a / (a.sum(dim=-1, keepdim=True) + eps)
    return ((rho * a).unsqueeze(-1) * v).sum(dim=-2, keepdim=True).expand_as(v)


@pytest.mark.parametrize("form", ["pure", "linear"])
def test_infsa_matches_official(form):
    mixer = InfiniteSelfAttention(16, 2, form=form, rho_init=0.9).double()
    q, k, v = qkv(2, 2, 12, 8)
    assert abs(mixer.rho.item() - 0.9) < 1e-7
    want = official_infsa(q, k, v, form, mixer.rho.item())
    torch.testing.assert_close(mixer(q, k, v, hw=(3, 4)), want, **TIGHT)


def test_infsa_pure_operator_frobenius_norm_is_rho():
    mixer = InfiniteSelfAttention(8, 2, form="pure", rho_init=0.8).double()
    q, k, _ = qkv(1, 2, 4, 4)
    eye = torch.eye(4, dtype=torch.float64).expand(1, 2, 4, 4)       # out = Â @ I = Â
    attn = mixer(q, k, eye, hw=(2, 2))
    s = F.relu(q @ k.transpose(-1, -2) / 4).flatten(-2).norm(dim=-1)
    rho = mixer.rho.item()
    torch.testing.assert_close(attn.flatten(-2).norm(dim=-1), rho * s / (s + 1e-6), **TIGHT)
    assert not torch.allclose(attn.sum(-1), torch.ones(1, 2, 4, dtype=torch.float64))   # no row normalisation


def test_linear_infsa_same_vector_for_every_token_and_permutation_invariant():
    mixer = InfiniteSelfAttention(16, 2).double()
    assert mixer.form == "linear"
    q, k, v = qkv(2, 2, 12, 8)
    out = mixer(q, k, v, hw=(3, 4))
    torch.testing.assert_close(out, out[:, :, :1].expand_as(out), **TIGHT)
    perm = torch.randperm(12)
    torch.testing.assert_close(mixer(q[:, :, perm], k[:, :, perm], v[:, :, perm], hw=(3, 4)), out, **TIGHT)
    ones = torch.ones_like(v)                                          # weights sum to ρ (up to eps)
    torch.testing.assert_close(mixer(q, k, ones, hw=(3, 4)), mixer.rho.detach() * ones, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["pure", "linear"])
def test_infsa_rho_receives_gradient(form):
    mixer = InfiniteSelfAttention(16, 2, form=form)
    q, k, v = qkv(1, 2, 9, 8, dtype=torch.float32)
    mixer(q, k, v, hw=(3, 3)).sum().backward()
    assert mixer.rho_logit.grad is not None and mixer.rho_logit.grad.abs() > 0
    frozen = InfiniteSelfAttention(16, 2, form=form, rho_trainable=False)
    assert not frozen.rho_logit.requires_grad
    torch.testing.assert_close(frozen.rho, torch.tensor(0.95))


@pytest.mark.parametrize("form", ["pure", "linear"])
def test_infsa_gradcheck(form):
    mixer = randomize_(InfiniteSelfAttention(4, 2, form=form)).double()
    gradcheck_mixer(mixer, *qkv(1, 2, 6, 2), hw=(2, 3))


# ----------------------------------------------------------------------------------------------
# backends: the mechanism-specific core calls (φ of width d+1 for QT, width-1 constant features
# with key weights for Linear-InfSA, fused ReLU for Mirror) run on the Triton path too
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_triton_backend_matches_torch(name):
    ops = pytest.importorskip("linvision.attn.ops")
    q, k, v = qkv(2, 2, 15, 16, dtype=torch.float32, grad=True)
    if not ops.supports(q, v):
        pytest.skip("Triton kernels unavailable (no CUDA and no TRITON_INTERPRET)")
    ref = randomize_(create_mixer(name, 32, 2, backend="torch"))
    fast = create_mixer(name, 32, 2, backend="triton")
    fast.load_state_dict(ref.state_dict())
    out_ref, out_fast = ref(q, k, v, hw=(3, 5)), fast(q, k, v, hw=(3, 5))
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-4, atol=1e-4)
    g_ref = torch.autograd.grad(out_ref.square().sum(), (q, k, v))
    g_fast = torch.autograd.grad(out_fast.square().sum(), (q, k, v))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
