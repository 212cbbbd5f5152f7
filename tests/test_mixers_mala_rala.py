"""MALA, RALA and softmax mixers against their explicit N×N forms (as the official code computes them)."""
import pytest
import torch
import torch.nn.functional as F

from linvision.attn import (MagnitudeAwareLinearAttention, RankAugmentedLinearAttention, RopeGrid,
                            SoftmaxAttention, apply_rope, rope_angle, rope_tables)


def _qkv(b=2, h=2, n=20, d=8):
    return (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))


def _rotate(x, grid):
    sin, cos = rope_tables(rope_angle(x.shape[-1]), *grid)
    return apply_rope(x, sin.double(), cos.double())


@pytest.mark.parametrize("with_rope", [False, True])
def test_mala_matches_attention_matrix_form(with_rope):
    grid, d = (4, 5), 8
    q, k, v = _qkv(d=d)
    n, s = grid[0] * grid[1], d ** -0.5
    phq, phk = F.elu(q) + 1, F.elu(k) + 1
    kappa = s / n * phq @ phk.transpose(-1, -2)                        # κ_ij on un-rotated features
    z = kappa.sum(-1, keepdim=True)
    num = s / n * (_rotate(phq, grid) @ _rotate(phk, grid).transpose(-1, -2) if with_rope else phq @ phk.transpose(-1, -2))
    a = (1 + 1 / (z + 1e-6)) * num - z / n                            # a_ij = β_i (s/N) q̃·k̃ − γ_i
    rope = RopeGrid(rope_angle(d), *grid) if with_rope else None
    out = MagnitudeAwareLinearAttention(d * 2, 2)(q, k, v, hw=grid, rope=rope)
    torch.testing.assert_close(out, a @ v, rtol=1e-10, atol=1e-12)
    if not with_rope:  # rows sum to 1 up to the ε term; with RoPE they do not
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("with_rope", [False, True])
def test_rala_matches_closed_form(with_rope):
    grid, d = (3, 6), 8
    q, k, v = _qkv(d=d, n=18)
    s = d ** -0.5
    phq, phk = F.elu(q) + 1, F.elu(k) + 1
    alpha = torch.softmax(s * phq.mean(2, keepdim=True) @ phk.transpose(-1, -2), dim=-1)  # (B, H, 1, N)
    den = (alpha * (phq @ phk.transpose(-1, -2))).sum(-1, keepdim=True) + 1e-6
    scores = _rotate(phq, grid) @ _rotate(phk, grid).transpose(-1, -2) if with_rope else phq @ phk.transpose(-1, -2)
    ref = (alpha * scores) @ v / den
    rope = RopeGrid(rope_angle(d), *grid) if with_rope else None
    out = RankAugmentedLinearAttention(d * 2, 2)(q, k, v, hw=grid, rope=rope)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_softmax_mixer_with_rope():
    grid, d = (4, 4), 8
    q, k, v = _qkv(d=d, n=16)
    ref = torch.softmax(d ** -0.5 * _rotate(q, grid) @ _rotate(k, grid).transpose(-1, -2), -1) @ v
    out = SoftmaxAttention(d * 2, 2)(q, k, v, hw=grid, rope=RopeGrid(rope_angle(d), *grid))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_mixers_are_differentiable():
    grid, d = (2, 3), 4
    q, k, v = (t.requires_grad_() for t in _qkv(b=1, h=1, n=6, d=d))
    rope = RopeGrid(rope_angle(d), *grid)
    for mixer in (MagnitudeAwareLinearAttention(d, 1), RankAugmentedLinearAttention(d, 1)):
        assert torch.autograd.gradcheck(lambda q, k, v: mixer(q, k, v, hw=grid, rope=rope), (q, k, v))
