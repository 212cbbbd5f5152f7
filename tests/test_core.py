"""The shared core's reference path: linear form == explicit N×N form, dtypes, validation."""
import itertools

import pytest
import torch

from linvision.attn import RopeGrid, linear_attention, rope_angle
from linvision.attn.ops.naive import attention_weights, quadratic_attention

NORMALIZATIONS = ("division", "magnitude_aware", "injective", "none")
FEATURE_MAPS = ("identity", "relu", "elu1")
GRIDS = [(1, 1), (1, 7), (3, 4), (5, 7)]  # N = 1, 7, 12, 35


def _inputs(b, h, n, d, dtype=torch.float64, dv=None):
    q = torch.randn(b, h, n, d, dtype=dtype)
    k = torch.randn(b, h, n, d, dtype=dtype)
    v = torch.randn(b, h, n, dv or d, dtype=dtype)
    return q, k, v


def _case_kwargs(normalization, feature_map, grid, d, with_rope, with_weights, b, h):
    n = grid[0] * grid[1]
    kwargs = dict(normalization=normalization, feature_map=feature_map, scale=d ** -0.5, eps=1e-6)
    if with_rope:
        kwargs["rope"] = RopeGrid(rope_angle(d).double(), *grid)
    if with_weights:
        kwargs["key_weights"] = torch.rand(b, h, n, dtype=torch.float64) * n
    return kwargs


@pytest.mark.parametrize("normalization,feature_map", list(itertools.product(NORMALIZATIONS, FEATURE_MAPS)))
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("with_rope,with_weights", [(False, False), (True, False), (False, True), (True, True)])
def test_linear_equals_quadratic_fp64(normalization, feature_map, grid, with_rope, with_weights):
    d = 8
    b, h = 2, 3
    n = grid[0] * grid[1]
    q, k, v = _inputs(b, h, n, d, dv=5)
    # Positive features keep the division form's normaliser away from zero (as in every mechanism).
    if normalization == "division" and feature_map == "identity":
        q, k = q.abs(), k.abs()
    kwargs = _case_kwargs(normalization, feature_map, grid, d, with_rope, with_weights, b, h)
    out = linear_attention(q, k, v, backend="torch", **kwargs)
    ref = quadratic_attention(q, k, v, **kwargs)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("d", [4, 16, 32, 64])
def test_head_dims_fp64(d):
    q, k, v = _inputs(1, 1, 20, d)
    kwargs = dict(normalization="magnitude_aware", feature_map="elu1", scale=d ** -0.5,
                  rope=RopeGrid(rope_angle(d).double(), 4, 5))
    torch.testing.assert_close(linear_attention(q, k, v, **kwargs), quadratic_attention(q, k, v, **kwargs),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("normalization,kwargs", [
    ("injective", dict(feature_map="identity", key_weights=torch.rand(2, 2, 12, dtype=torch.float64) * 12)),
    ("magnitude_aware", dict(feature_map="elu1", eps=0.0)),
])
def test_rows_summing_to_one_reproduce_a_constant_value(normalization, kwargs):
    """The injective weights (here with key weights) and the magnitude-aware ones (eps = 0) sum to one per
    row, so linear_attention itself (not only the explicit oracle) maps a constant v to that constant."""
    q, k, _ = _inputs(2, 2, 12, 8)
    v = torch.full((2, 2, 12, 5), 0.0, dtype=torch.float64) + torch.randn(2, 2, 1, 5, dtype=torch.float64)
    a = attention_weights(q, k, normalization=normalization, scale=8 ** -0.5, **kwargs)
    torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)), rtol=0, atol=1e-12)
    out = linear_attention(q, k, v, normalization=normalization, scale=8 ** -0.5, backend="torch", **kwargs)
    torch.testing.assert_close(out, v, rtol=0, atol=1e-12)


# Low-precision inputs against float64 (one rounding of the output dtype): tests/test_attn_rounding.py.


def test_autocast_bf16_stays_in_fp32_inside():
    q, k, v = _inputs(1, 2, 49, 16, dtype=torch.float32)
    kwargs = dict(normalization="magnitude_aware", feature_map="elu1", scale=0.25, rope=RopeGrid(rope_angle(16), 7, 7))
    ref = linear_attention(q, k, v, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_attention(q, k, v, **kwargs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_fp16_no_overflow_at_large_n(normalization):
    n = 262144  # a 2048×2048 image at stride 4
    q, k, v = (torch.randn(1, 1, n, 16).mul(4).half() for _ in range(3))
    out = linear_attention(q, k, v, normalization=normalization, feature_map="elu1", scale=0.25)
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()


def test_gradcheck_reference_path():
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 6, 4))
    w = (torch.rand(1, 2, 6, dtype=torch.float64) + 0.5).requires_grad_()
    rope = RopeGrid(rope_angle(4).double(), 2, 3)
    for normalization in NORMALIZATIONS:
        fn = lambda q, k, v, w: linear_attention(q, k, v, normalization=normalization, feature_map="elu1",
                                                 scale=0.5, key_weights=w, rope=rope)
        assert torch.autograd.gradcheck(fn, (q, k, v, w))


@pytest.mark.parametrize("bad,match", [
    (dict(q=torch.randn(2, 5, 4)), "4-D"),
    (dict(k=torch.randn(1, 2, 6, 8)), "same shape"),
    (dict(v=torch.randn(1, 2, 7, 4)), "v must be"),
    (dict(normalization="softmax"), "normalization"),
    (dict(feature_map="gelu"), "feature_map"),
    (dict(key_weights=torch.ones(1, 2, 5)), "key_weights"),
    (dict(rope=RopeGrid(rope_angle(4), 2, 2)), "RoPE grid"),
    (dict(backend="cuda-magic"), "backend"),
])
def test_bad_input_raises_clear_error(bad, match):
    args = dict(q=torch.randn(1, 2, 6, 4), k=torch.randn(1, 2, 6, 4), v=torch.randn(1, 2, 6, 4))
    args.update(bad)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=match):
        linear_attention(q, k, v, **args)
