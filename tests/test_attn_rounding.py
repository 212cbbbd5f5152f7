"""The linear-attention core (both backends) against float64, with tolerances set by the dtype's rounding.

Every comparison here is elementwise, against the float64 result computed from the *same rounded inputs*
(the low-precision tensors converted exactly to float64), so that input rounding is not part of the error:

    |out − ref₆₄| ≤ u_out · |ref₆₄| + u_inner · scale

``u_out`` is the unit roundoff of the output dtype (fp32 2⁻²⁴, fp16 2⁻¹¹, bf16 2⁻⁸): the one rounding the
contract allows, since every sum is accumulated in fp32. ``u_inner`` is the inner arithmetic's (fp32 sums:
2⁻²⁰ leaves room for the reduction orders; the GPU kernels' tf32 and bf16 operands add their own unit
roundoff) and ``scale`` is the elementwise magnitude of the terms that make up each output (the same
formula on |φq|, |S|, |z|, |v̄|), so cancellations do not borrow tolerance from other elements. A tolerance
scaled by max|ref| (as the wide kernel sweep in test_triton_attn.py uses) lets any error under about
2 % through in bf16; these tests do not.

The exact-input cases use small integers (and eps = 0 with normalisers that are powers of two): every
intermediate is then representable in every dtype, so even the GPU's bf16-operand kernels must return
the float64 result correctly rounded — an error of 1 % is 2.5 bf16 roundings.
"""
import os

os.environ.setdefault("LINVISION_TRITON_AUTOTUNE", "0")  # one config per kernel (as test_triton_attn.py)

import pytest  # noqa: E402
import torch  # noqa: E402

from linvision.attn.core import NORMALIZATIONS, feature_map_fn, linear_attention, linear_attention_torch  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
FP32_SUMS = 2.0 ** -20


def _inner_roundoff(dtype: torch.dtype, backend: str) -> float:
    """Unit roundoff of the arithmetic inside the op (not of its output)."""
    if backend == "triton" and ON_GPU:
        # The kernels' dot operands (linvision.attn.ops.policy.dot_mode): 3×tf32 for fp32, tf32 for fp16,
        # bf16 for bf16; each product rounds two operands (and the RoPE-rotated key a third time).
        return {torch.float32: FP32_SUMS, torch.float16: 3 * 2.0 ** -11, torch.bfloat16: 3 * 2.0 ** -8}[dtype]
    return FP32_SUMS  # the reference, and the kernels under TRITON_INTERPRET (3×tf32 ≈ fp32 everywhere)


def _magnitudes(q, k, v, normalization, feature_map, scale, eps):
    """float64 (reference, elementwise term magnitude) of the op on float64 copies of q, k, v (no RoPE,
    no key weights): the reference output, and the same formula on absolute values."""
    qf, kf = feature_map_fn(feature_map, q.double()), feature_map_fn(feature_map, k.double())
    v64 = v.double()
    n_tok = q.shape[2]
    num_abs = (qf.abs() @ (kf.abs().transpose(-1, -2) @ v64.abs())) * (scale / n_tok)
    z = (qf * kf.mean(2, keepdim=True)).sum(-1, keepdim=True) * scale
    z_abs = (qf.abs() * kf.abs().mean(2, keepdim=True)).sum(-1, keepdim=True) * scale
    vbar_abs = v64.abs().mean(2, keepdim=True)
    if normalization == "division":
        mag = num_abs / (z + eps) + num_abs * z_abs / (z + eps) ** 2
    elif normalization == "magnitude_aware":
        mag = num_abs * (1 + 1 / (z + eps)) + num_abs * z_abs / (z + eps) ** 2 + z_abs * vbar_abs
    elif normalization == "injective":
        mag = num_abs + (1 + z_abs) * vbar_abs
    else:
        mag = num_abs
    ref = linear_attention_torch(q.double(), k.double(), v64, normalization=normalization,
                                 feature_map=feature_map, scale=scale, eps=eps)
    return ref, mag


def assert_within_rounding(name, out, ref64, scale64, dtype, inner):
    """Elementwise ``|out − ref64| ≤ u(dtype)·|ref64| + inner·scale64``, reporting the worst element."""
    assert out.dtype == dtype, f"{name}: dtype {out.dtype}, want {dtype}"
    err = (out.double() - ref64).abs()
    bound = UNIT_ROUNDOFF[dtype] * ref64.abs() + inner * scale64
    bad = ~(err <= bound)                      # NaN counts as bad
    if bad.any():
        ratio = torch.where(bad, err / bound.clamp_min(1e-300), torch.zeros_like(err))
        i = int(ratio.flatten().nan_to_num(float("inf")).argmax())
        raise AssertionError(f"{name}: {int(bad.sum())} of {err.numel()} elements outside the {dtype} rounding "
                             f"bound; worst: got {out.flatten()[i].item()!r}, float64 {ref64.flatten()[i].item()!r}, "
                             f"error {err.flatten()[i].item():.3g} > bound {bound.flatten()[i].item():.3g}")


def _rounded_inputs(dtype, b=2, h=2, n=61, d=16, device=DEVICE):
    """q, k unit normal; v positive (so that the division and plain forms sum terms of one sign)."""
    q, k = torch.randn(b, h, n, d, device=device), torch.randn(b, h, n, d, device=device)
    v = torch.rand(b, h, n, d, device=device) + 0.5
    return q.to(dtype), k.to(dtype), v.to(dtype)


# ---------------------------------------------------------------------------------------------
# Low-precision inputs: the output is the float64 result of the rounded inputs, rounded once.
# ---------------------------------------------------------------------------------------------

BACKENDS = ["torch", "triton"]
CPU_DTYPES = [torch.float16, torch.bfloat16]


def _backend_dtype_cases():
    cases = []
    for backend in BACKENDS:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            if backend == "torch" and dtype == torch.float32:
                continue  # fp32 reference vs fp64: covered by test_core's fp64 identities and the cases below
            marks = []
            if backend == "triton" and dtype == torch.bfloat16:
                marks = [pytest.mark.cuda]  # the interpreter's bf16 tl.dot is wrong
            cases.append(pytest.param(backend, dtype, marks=marks, id=f"{backend}-{str(dtype)[6:]}"))
    return cases


@pytest.mark.parametrize("backend,dtype", _backend_dtype_cases())
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_output_is_fp64_result_of_rounded_inputs_within_one_rounding(backend, dtype, normalization):
    """Accumulating in the input dtype (or any lost fp32 step) makes errors of several roundings: caught."""
    q, k, v = _rounded_inputs(dtype)
    opts = dict(normalization=normalization, feature_map="elu1", scale=0.25, eps=1e-6)
    out = linear_attention(q, k, v, backend=backend, **opts)
    ref, mag = _magnitudes(q, k, v, **opts)
    assert_within_rounding(f"{backend} {normalization}", out, ref, mag, dtype, _inner_roundoff(dtype, backend))


# ---------------------------------------------------------------------------------------------
# Exact inputs: every intermediate representable, so even bf16 operands give the correctly rounded output.
# ---------------------------------------------------------------------------------------------

def _exact_inputs(dtype, b=1, h=2, n=16, d=16, device=DEVICE, seed=0):
    """Small-integer q, k, v, g with φ = identity, scale 1/2 and eps = 0: k's columns other than the first sum to
    zero and its first column is all ones, so z_i = q_i0 / 2 ∈ {1/2, 1, 2}; the state, k̄, v̄, the numerators
    and the backward's dS are sums of at most 16 products of integers ≤ 4 (≤ 8 significant bits)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-1, 2, (b, h, n, d), generator=gen).double()
    q[..., 0] = 2.0 ** torch.randint(0, 3, (b, h, n), generator=gen)
    half = torch.randint(-1, 2, (b, h, n // 2, d), generator=gen).double()
    k = torch.cat([half, -half], dim=2)
    k[..., 0] = 1.0
    v = torch.randint(-2, 3, (b, h, n, d), generator=gen).double()
    g = torch.randint(-2, 3, (b, h, n, d), generator=gen).double()
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v, g))


def _exact_cases():
    cases = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        marks = [pytest.mark.cuda] if dtype == torch.bfloat16 else []
        cases.append(pytest.param(dtype, marks=marks, id=str(dtype)[6:]))
    return cases


@pytest.mark.parametrize("dtype", _exact_cases())
def test_triton_exact_inputs_give_correctly_rounded_outputs(dtype):
    """Forward of every normalisation, and the backward of the plain form (whose gradients are integer sums
    too), on exactly representable data: within one rounding of the output dtype. On CUDA this checks the
    bf16-operand dot path of every kernel pass without any slack for operand rounding."""
    q, k, v, g = _exact_inputs(dtype)
    opts = dict(feature_map="identity", scale=0.5, eps=0.0)
    for normalization in NORMALIZATIONS:
        out = linear_attention(q, k, v, normalization=normalization, backend="triton", **opts)
        ref = linear_attention_torch(q.double(), k.double(), v.double(), normalization=normalization, **opts)
        assert_within_rounding(f"out {normalization}", out, ref, torch.zeros_like(ref), dtype, 0.0)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = linear_attention(*leaves, normalization="none", backend="triton", **opts)
    grads = torch.autograd.grad(out, leaves, g)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = linear_attention_torch(*ref_leaves, normalization="none", **opts)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g.double())
    for name, a, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_within_rounding(name, a, r, torch.zeros_like(r), dtype, 0.0)


# ---------------------------------------------------------------------------------------------
# Degenerate normaliser: z = 0 (a ReLU query row that is all negative) and z ≈ eps.
# ---------------------------------------------------------------------------------------------

EPS = 1e-6


def _degenerate_inputs(device=DEVICE, n=13, d=16, scale=0.5):
    """ReLU features; row 2 of every head all negative (φq = 0, so z = 0 and the numerator is 0); row 5 with
    one small positive entry tuned so that z = eps exactly in float64; row 7 with z = eps/100."""
    q, k = torch.randn(2, 2, n, d, dtype=torch.float64), torch.randn(2, 2, n, d, dtype=torch.float64)
    k[..., 0] = k[..., 0].abs() + 0.5                       # k̄₀ > 0
    kbar0 = torch.relu(k[..., 0]).mean(-1)                  # (B, H)
    for row, z in ((2, None), (5, EPS), (7, EPS / 100)):
        q[:, :, row] = -q[:, :, row].abs() - 0.1
        if z is not None:
            q[:, :, row, 0] = z / (scale * kbar0)
    v = torch.randn(2, 2, n, d, dtype=torch.float64)
    g = torch.randn(2, 2, n, d, dtype=torch.float64)
    return tuple(t.to(device) for t in (q, k, v, g))


def _rowwise_close(name, got, ref, rtol):
    """Elementwise, with an absolute floor of ``rtol`` × the largest |ref| of the same token row (the rows
    with z ≈ eps carry gradients ~1/eps larger than the others)."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    row_scale = ref.abs().amax(-1, keepdim=True) if ref.dim() == 4 else ref.abs()
    err = (got.double() - ref).abs()
    bound = rtol * (ref.abs() + row_scale) + 1e-300
    assert (err <= bound).all(), f"{name}: max error/bound {(err / bound).max().item():.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_zero_and_tiny_normaliser_forward_backward(backend, normalization):
    """z = 0: the output row is exactly 0 (v̄ for the injective form, whose weights then are the uniform
    1/N) and every gradient is finite; z ≈ eps: output and gradients match float64. Dropping eps from
    either backend's division makes the z = 0 row NaN."""
    q, k, v, g = _degenerate_inputs()
    opts = dict(normalization=normalization, feature_map="relu", scale=0.5, eps=EPS)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    out = linear_attention(*leaves, backend=backend, **opts)
    grads = torch.autograd.grad(out, leaves, g.float())
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = linear_attention_torch(*ref_leaves, **opts)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g)

    zero_row = out[:, :, 2]
    expected = v.float().mean(2) if normalization == "injective" else torch.zeros_like(zero_row)
    torch.testing.assert_close(zero_row.detach(), expected, rtol=1e-6, atol=1e-7)
    _rowwise_close("out", out.detach(), ref.detach(), 1e-4)
    for name, a, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        _rowwise_close(name, a, r, 1e-4 if name == "dq" else 2e-4)
    assert torch.equal(grads[0][:, :, 2], torch.zeros_like(grads[0][:, :, 2]))  # ReLU'(negative) = 0


# ---------------------------------------------------------------------------------------------
# GPU: realistic sizes.
# ---------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_triton_within_operand_rounding_at_model_size_cuda(normalization, dtype):
    """B·H = 2·4 heads of 3136 tokens (a 224² image at stride 4), d = 64: elementwise within the rounding
    bound of the kernels' operand precision."""
    q, k, v = _rounded_inputs(dtype, b=2, h=4, n=3136, d=64)
    opts = dict(normalization=normalization, feature_map="elu1", scale=64 ** -0.5, eps=1e-6)
    out = linear_attention(q, k, v, backend="triton", **opts)
    ref, mag = _magnitudes(q, k, v, **opts)
    assert_within_rounding(f"triton {normalization}", out, ref, mag, dtype, _inner_roundoff(dtype, "triton"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_exact_inputs_at_model_size_cuda(dtype):
    """The exact-input check with many heads (B·H = 64: one program per head, no atomics) and with one head
    (every token split: fp32 atomics into the state) — still correctly rounded."""
    for b, h in ((8, 8), (1, 1)):
        q, k, v, _ = _exact_inputs(dtype, b=b, h=h)
        for normalization in NORMALIZATIONS:
            out = linear_attention(q, k, v, normalization=normalization, feature_map="identity", scale=0.5, eps=0.0,
                                   backend="triton")
            ref = linear_attention_torch(q.double(), k.double(), v.double(), normalization=normalization,
                                         feature_map="identity", scale=0.5, eps=0.0)
            assert_within_rounding(f"{b}x{h} {normalization}", out, ref, torch.zeros_like(ref), dtype, 0.0)
