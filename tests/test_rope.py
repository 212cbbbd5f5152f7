"""2-D RoPE: the linspace frequencies, the table layout and the rotation's invariances."""
import math

import torch

from linvision.attn import apply_rope, rope_angle, rope_tables


def test_angle_uses_linspace_endpoints_and_repeats_pairs():
    angle = rope_angle(16)
    assert angle.shape == (8,) and angle.dtype == torch.float32
    theta = angle[::2]
    torch.testing.assert_close(angle[1::2], theta)
    assert theta[0].item() == 1.0
    assert math.isclose(theta[-1].item(), 1e-4, rel_tol=1e-6)  # 10000^-1: linspace includes the end


def test_tables_closed_form():
    d, h, w = 8, 3, 5
    angle = rope_angle(d)
    sin, cos = rope_tables(angle, h, w)
    assert sin.shape == (h * w, d)
    for t in range(h * w):
        y, x = divmod(t, w)
        a = torch.cat([y * angle, x * angle])
        torch.testing.assert_close(sin[t], torch.sin(a))
        torch.testing.assert_close(cos[t], torch.cos(a))


def test_rotation_preserves_norm_and_is_relative():
    d, h, w = 16, 4, 6
    sin, cos = rope_tables(rope_angle(d).double(), h, w)
    sin, cos = sin.double(), cos.double()
    q = torch.randn(1, 1, 1, d, dtype=torch.float64).expand(1, 1, h * w, d)
    k = torch.randn(1, 1, 1, d, dtype=torch.float64).expand(1, 1, h * w, d)
    rq, rk = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    # Same offset (dy, dx) = (1, 2) from two different anchors gives the same score.
    s1 = (rq[0, 0, 0 * w + 0] * rk[0, 0, 1 * w + 2]).sum()
    s2 = (rq[0, 0, 2 * w + 3] * rk[0, 0, 3 * w + 5]).sum()
    torch.testing.assert_close(s1, s2)
