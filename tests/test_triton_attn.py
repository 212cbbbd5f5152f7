"""The Triton linear-attention kernels against the PyTorch reference (values and gradients).

On a CPU-only machine the kernels run under ``TRITON_INTERPRET=1`` (set by conftest.py before
anything imports them): that subset is kept tiny (fp32/fp16 — Triton's interpreter multiplies the raw
bit patterns of bf16 ``tl.dot`` operands, so bf16 runs only on a GPU). The full grid (dtypes × head dims × odd N × every option, strided views,
torch.compile, the fp16 overflow check at N = 262144) is ``@pytest.mark.cuda``.

Tolerances (elementwise ``|tri − ref| ≤ atol + rtol·|ref|`` with ``atol = rtol·max|ref|``,
against the reference fed the same inputs): fp32 rtol 1e-4; fp16 5e-3; bf16 2e-2. The kernels'
dot operands (``policy.dot_mode``): bf16 for bf16 inputs, tf32 for fp16, 3×tf32 for fp32 and under
the interpreter; the reference rounds its fp32 result to the input dtype as the kernels do.
``test_attn_rounding.py`` holds the tighter, dtype-rounding-based checks.
"""
import math
import os

# Tests compile many option combinations: one autotune config each (benchmarks tune fully).
os.environ.setdefault("LINVISION_TRITON_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from linvision.attn import core  # noqa: E402
from linvision.attn.core import FEATURE_MAPS, NORMALIZATIONS, linear_attention  # noqa: E402
from linvision.attn.ops.naive import linear_attention_torch  # noqa: E402
from linvision.attn.rope import RopeGrid, rope_angle  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _grid(n):
    """A (height, width) factorisation of n tokens, as square as possible."""
    h = max(c for c in range(1, math.isqrt(n) + 1) if n % c == 0)
    return h, n // h


def _inputs(b, h, n, d, dv, dtype, feature_map, weights, rope, device=DEVICE):
    q, k = torch.randn(b, h, n, d, device=device), torch.randn(b, h, n, d, device=device)
    if feature_map == "identity":          # keep the division's normaliser away from zero
        q, k = q.abs() + 0.1, k.abs() + 0.1
    v = torch.randn(b, h, n, dv, device=device)
    w = torch.rand(b, h, n, device=device) * 2 if weights else None
    grid = RopeGrid(rope_angle(d).to(device), *_grid(n)) if rope else None
    return q.to(dtype), k.to(dtype), v.to(dtype), w, grid


def _close(name, tri, ref, rtol):
    assert tri.dtype == ref.dtype, f"{name}: dtype {tri.dtype} != {ref.dtype}"
    assert torch.isfinite(tri).all(), f"{name}: non-finite values"
    atol = rtol * ref.float().abs().max().item() + 1e-12
    torch.testing.assert_close(tri.float(), ref.float(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _rerun_in_fresh_process(env: dict, selection: str, *pytest_args: str) -> str:
    """Run the tests of this file matching ``selection`` in a new pytest process with ``env`` added (the
    kernel settings read at import take effect there); assert it passed and return its stdout."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                           "-k", selection, *pytest_args], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return proc.stdout


def check_against_reference(b, h, n, d, dv, dtype, normalization="division", feature_map="elu1", weights=False,
                            rope=False, scale=0.5, splits=None, monkeypatch=None):
    """Run the Triton backend and the reference forward + backward; compare output and grads."""
    if splits is not None:
        from linvision.attn.ops import policy
        monkeypatch.setattr(policy, "FORCE_SPLITS", splits)
    q, k, v, w, grid = _inputs(b, h, n, d, dv, dtype, feature_map, weights, rope)
    leaves = [q, k, v] + ([w] if weights else [])
    tri_in = [t.clone().requires_grad_() for t in leaves]
    ref_in = [t.clone().requires_grad_() for t in leaves]
    opts = dict(normalization=normalization, feature_map=feature_map, scale=scale, rope=grid)
    out = linear_attention(*tri_in[:3], key_weights=tri_in[3] if weights else None, backend="triton", **opts)
    ref = linear_attention_torch(*ref_in[:3], key_weights=ref_in[3] if weights else None, **opts)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    rtol = TOL[dtype]
    _close("out", out, ref, rtol)
    for name, a, r in zip(("dq", "dk", "dv", "dw"), tri_in, ref_in):
        if n == 1 and name in ("dq", "dk", "dw") and normalization in ("division", "magnitude_aware"):
            # One token: out = v·z/(z+ε) exactly, so these grads are O(ε) differences of O(1) terms:
            # compare absolutely, on the scale of the well-conditioned dv.
            atol = rtol * ref_in[2].grad.float().abs().max().item()
            torch.testing.assert_close(a.grad.float(), r.grad.float(), rtol=0, atol=atol)
            continue
        _close(name, a.grad, r.grad, rtol)


# ---------------------------------------------------------------------------------------------
# CPU (interpreter) subset: one case per option family, tiny shapes, odd sizes for the masks.
# ---------------------------------------------------------------------------------------------

CPU_CASES = [
    # (b, h, n, d, dv, dtype, normalization, feature_map, weights, rope, splits)
    (1, 1, 1, 16, 16, torch.float32, "division", "elu1", False, True, None),
    (1, 1, 7, 48, 48, torch.float32, "division", "elu1", True, True, None),
    (2, 3, 37, 32, 32, torch.float32, "division", "elu1", False, False, None),
    (1, 2, 23, 16, 24, torch.float32, "division", "relu", True, False, None),
    (1, 1, 197, 96, 96, torch.float32, "magnitude_aware", "elu1", False, True, 2),
    (1, 1, 45, 64, 64, torch.float32, "injective", "identity", True, True, None),
    (1, 2, 30, 32, 32, torch.float32, "none", "relu", False, True, None),
    (1, 1, 130, 128, 128, torch.float32, "division", "identity", True, True, 3),
    (1, 1, 19, 64, 64, torch.float16, "magnitude_aware", "elu1", True, True, None),
    (1, 1, 70, 32, 32, torch.float16, "division", "elu1", False, False, 2),
    (1, 1, 3137, 16, 16, torch.float32, "division", "elu1", True, True, 4),
    (2, 1, 41, 32, 32, torch.float16, "injective", "relu", True, True, 3),
    (1, 2, 50, 48, 48, torch.float16, "none", "identity", False, True, None),
]


@pytest.mark.parametrize("b,h,n,d,dv,dtype,normalization,feature_map,weights,rope,splits", CPU_CASES)
def test_matches_reference_small(b, h, n, d, dv, dtype, normalization, feature_map, weights, rope, splits,
                                 monkeypatch):
    check_against_reference(b, h, n, d, dv, dtype, normalization, feature_map, weights, rope, splits=splits,
                            monkeypatch=monkeypatch)


def test_several_state_copies(monkeypatch):
    """More token splits than REDUCE_SPLITS_PER_COPY: partial states go to several fp32 copies, then summed."""
    from linvision.attn.ops import policy
    monkeypatch.setattr(policy, "REDUCE_SPLITS_PER_COPY", 2)
    check_against_reference(1, 2, 300, 32, 32, torch.float32, "magnitude_aware", "elu1", weights=True, rope=True,
                            splits=5, monkeypatch=monkeypatch)


def test_strided_tile_order_matches_reference():
    """The autotuner may pick the strided tile order (program s of a head takes tiles s, s+S, …;
    jit.tile_range); the suite's single config is contiguous, so the split cases of the small subset
    (every kernel, forced splits, several state copies) re-run in a fresh process with the single config
    strided (LINVISION_TRITON_TILE_ORDER, read at import)."""
    stdout = _rerun_in_fresh_process({"LINVISION_TRITON_TILE_ORDER": "strided"},
                                     "test_matches_reference_small or test_several_state_copies", "-m", "not cuda")
    assert " passed" in stdout, stdout[-2000:]


@pytest.mark.parametrize("normalization", ["division", "injective"])
def test_backward_torch_twins(normalization):
    """The PyTorch twins of the backward passes (used for wide fp32 heads on GPU) equal the kernels."""
    from linvision.attn.ops.linear_attn_bwd import backward_kv, backward_q
    from linvision.attn.ops.naive import backward_kv_torch, backward_q_torch
    from linvision.attn.ops.policy import dot_mode
    from linvision.attn.ops.linear_attn_fwd import forward_state
    q, k, v, w, grid = _inputs(1, 2, 20, 16, 16, torch.float32, "elu1", True, True)
    angle = grid.angle.float().contiguous()
    mode = dot_mode(q, k, v)
    state = forward_state(k, v, w, angle, grid.width, normalization, "elu1", 0.5, mode)
    g = torch.randn_like(v)
    dq, dstate = backward_q(g, q, state, angle, grid.width, normalization, "elu1", 0.5, 1e-6, mode)
    dq_t, dstate_t = backward_q_torch(g, q, state, angle, grid.width, normalization, "elu1", 0.5, 1e-6)
    _close("dq", dq, dq_t, 1e-4)
    used = 16 * 16 + 16 + (16 if normalization == "injective" else 0)
    _close("dstate", dstate[:, :used], dstate_t[:, :used], 1e-4)
    grads = backward_kv(k, v, w, angle, dstate, grid.width, normalization, "elu1", 0.5, mode)
    grads_t = backward_kv_torch(k, v, w, angle, dstate, grid.width, normalization, "elu1", 0.5)
    for name, a, b in zip(("dk", "dv", "dw"), grads, grads_t):
        _close(name, a, b, 1e-4)


def test_auto_backend_and_validation():
    q = torch.randn(1, 1, 5, 16)
    # auto on CPU tensors is the reference, bit for bit.
    assert torch.equal(linear_attention(q, q, q, backend="auto"), linear_attention_torch(q, q, q))
    assert "triton" in core.BACKENDS
    with pytest.raises(ValueError, match="backend"):
        linear_attention(q, q, q, backend="cuda")


def test_auto_backend_under_fake_tensors_is_the_reference():
    """Shape propagation and MAC counting of a CUDA model run the ops on fake tensors: "auto" takes the reference
    there (the kernels need real memory; fake CUDA tensors need no GPU)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    with FakeTensorMode():
        q = torch.empty(2, 3, 20, 16, device="cuda", dtype=torch.bfloat16)
        v = torch.empty(2, 3, 20, 8, device="cuda", dtype=torch.bfloat16)
        out = linear_attention(q, q, v, normalization="magnitude_aware", feature_map="elu1", backend="auto")
    assert isinstance(out, FakeTensor) and out.shape == (2, 3, 20, 8) and out.dtype == torch.bfloat16
    assert out.device.type == "cuda"


def _projection_views(leaf, heads, d):
    """q, k, v as (B, H, N, d) views of one projection output, as the models make them: a (B, 3C, H, W) conv output
    (either memory format) or a (B, N, 3, H, d) linear output."""
    if leaf.dim() == 5:
        return leaf.permute(2, 0, 3, 1, 4).unbind(0)
    n = leaf.shape[2] * leaf.shape[3]
    return tuple(t.reshape(leaf.shape[0], heads, d, n).transpose(-1, -2) for t in leaf.chunk(3, dim=1))


def test_strided_views_small():
    """q, k, v as views of one (B, N, 3, H, d) projection output, read through their strides."""
    b, n, heads, d = 1, 29, 2, 32
    q, k, v = _projection_views(torch.randn(b, n, 3, heads, d, device=DEVICE), heads, d)
    assert not q.is_contiguous()
    out = linear_attention(q, k, v, normalization="magnitude_aware", feature_map="elu1", backend="triton")
    ref = linear_attention_torch(q, k, v, normalization="magnitude_aware", feature_map="elu1")
    _close("out", out, ref, 1e-4)


def check_projection_views(src, w, g, heads, d, dtype, rtol, **opts):
    """Forward + backward of the Triton path on q, k, v views of ``src`` (rounded to ``dtype``) and key weights ``w``,
    against the fp32 reference on the same values: the output and every gradient come in the layout of their input
    (torch.empty_like) and match within ``rtol``. Returns the Triton output."""
    from linvision.attn.ops.policy import layout_like
    names = ("out", "dq", "dk", "dv", "dw")
    results = []
    for backend, cast in (("triton", dtype), ("torch", torch.float32)):
        leaf, wl = src.to(dtype).to(cast).clone().requires_grad_(), w.clone().requires_grad_()
        q, k, v = _projection_views(leaf, heads, d)
        out = linear_attention(q, k, v, key_weights=wl, backend=backend, **opts)
        results.append((out, *torch.autograd.grad(out, (q, k, v, wl), g.to(dtype).to(out.dtype))))
        if backend == "triton":
            for name, t, like in zip(names, results[0], (v, q, k, v, wl)):
                assert t.stride() == layout_like(like), f"{name}: strides {t.stride()}, want {layout_like(like)}"
    for name, tri, ref in zip(names, *results):
        _close(name, tri, ref.to(tri.dtype), rtol)
    return results[0][0]


def test_forward_without_recording_matches_the_recorded_one():
    """Where autograd records nothing (no_grad, inference_mode, inputs that need no gradient) the kernels run
    without the autograd Function: the same values as a recorded call, and no graph."""
    q, k, v, w, grid = _inputs(1, 2, 37, 32, 32, torch.float32, "elu1", True, True)
    opts = dict(normalization="magnitude_aware", feature_map="elu1", scale=0.5, rope=grid, backend="triton")
    recorded = linear_attention(q.clone().requires_grad_(), k, v, key_weights=w, **opts)
    assert recorded.grad_fn is not None
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            out = linear_attention(q.clone().requires_grad_(), k, v, key_weights=w, **opts)
        assert out.grad_fn is None and not out.requires_grad
        torch.testing.assert_close(out, recorded.detach(), rtol=0, atol=0)
    plain = linear_attention(q, k, v, key_weights=w, **opts)
    assert plain.grad_fn is None
    torch.testing.assert_close(plain, recorded.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_outputs_and_grads_take_input_layouts(channels_last):
    """q, k, v as (B, H, N, d) views of a conv's (B, 3C, H, W) output, as the models make them: the output and
    every gradient come in their input's layout (torch.empty_like), so the reshape back to (B, C, H, W) is a view
    of the output; values and gradients match the reference."""
    b, heads, d, hh, ww = 2, 2, 16, 3, 5
    c, n = heads * d, hh * ww
    x = torch.randn(b, 3 * c, hh, ww, device=DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.rand(b, n, heads, device=DEVICE) + 0.5).transpose(1, 2)          # (B, H, N), not contiguous
    g = torch.randn(b, heads, n, d, device=DEVICE)
    out = check_projection_views(x, w, g, heads, d, torch.float32, 1e-4, normalization="magnitude_aware",
                                 feature_map="elu1", scale=0.5)
    back = out.transpose(-1, -2).reshape(b, c, hh, ww)
    assert back.data_ptr() == out.data_ptr() and back._is_view(), "the reshape back to (B, C, H, W) copied"
    assert back.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_torch_compile_no_graph_break():
    """Through the custom op, fullgraph tracing succeeds and gradients match (aot_eager: no C++ compiler)."""
    q, k, v, w, grid = _inputs(1, 2, 12, 16, 16, torch.float32, "elu1", True, True)
    opts = dict(normalization="magnitude_aware", feature_map="elu1", rope=grid)

    def loss(q, k, v, w):
        return (linear_attention(q, k, v, key_weights=w, backend="triton", **opts) ** 2).sum()

    tri_in = [t.clone().requires_grad_() for t in (q, k, v, w)]
    ref_in = [t.clone().requires_grad_() for t in (q, k, v, w)]
    torch.compile(loss, backend="aot_eager", fullgraph=True)(*tri_in).backward()
    (linear_attention_torch(*ref_in[:3], key_weights=ref_in[3], **opts) ** 2).sum().backward()
    for a, r in zip(tri_in, ref_in):
        _close("grad", a.grad, r.grad, 1e-4)


def test_custom_op_registration():
    """torch.library.opcheck: schema, fake (meta) kernel and autograd registration are consistent."""
    from linvision.attn.ops.linear_attn import _fwd_op
    q, k, v, w, grid = _inputs(1, 1, 9, 16, 16, torch.float32, "elu1", True, True)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), w.requires_grad_(), grid.angle.float(),
            grid.width, "division", "elu1", 1.0, 1e-6)
    torch.library.opcheck(_fwd_op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    # Views of one (B, N, 3, H, d) projection: the fake kernels must promise the layouts the kernels write.
    views = _projection_views(torch.randn(1, 9, 3, 1, 16, device=DEVICE), 1, 16)
    strided = (*(t.requires_grad_() for t in views),) + args[3:]
    torch.library.opcheck(_fwd_op, strided, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    from linvision.attn.ops.linear_attn import _fwd_fake
    real = _fwd_op(*strided)[0].stride()
    with torch._subclasses.FakeTensorMode() as mode:
        assert _fwd_fake(*(mode.from_tensor(t) for t in strided[:5]), *strided[5:])[0].stride() == real


# ---------------------------------------------------------------------------------------------
# GPU: the full grid.
# ---------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [16, 32, 48, 64, 96, 128])
@pytest.mark.parametrize("n", [1, 7, 197, 3137])
def test_head_dims_and_lengths(dtype, d, n):
    """B·H = 1 (maximal token splitting), RoPE + key weights on, odd N, every head dim."""
    check_against_reference(1, 1, n, d, d, dtype, "division", "elu1", weights=True, rope=True)


@pytest.mark.cuda
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_every_option(normalization, feature_map, weights, rope):
    check_against_reference(2, 3, 197, 64, 64, torch.float32, normalization, feature_map, weights, rope)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_every_normalization_low_precision(dtype, normalization):
    check_against_reference(2, 3, 3137, 32, 32, dtype, normalization, "elu1", weights=True, rope=True)


@pytest.mark.cuda
@pytest.mark.parametrize("b,h,n,d,normalization,rope", [
    (1, 1, 50000, 64, "magnitude_aware", True), (2048, 3, 196, 32, "magnitude_aware", True),
    (8, 4, 3136, 64, "magnitude_aware", True),
    # the benchmark's option set, so the autotuned-config test checks the configs picked there
    (8, 4, 3136, 64, "division", False), (32, 3, 3136, 32, "division", False)])
def test_large_shapes_bf16(b, h, n, d, normalization, rope):
    check_against_reference(b, h, n, d, d, torch.bfloat16, normalization, "elu1", weights=False, rope=rope)


@pytest.mark.cuda
def test_different_value_dim():
    check_against_reference(2, 2, 300, 32, 96, torch.bfloat16, "injective", "relu", weights=True, rope=True)


@pytest.mark.cuda
def test_strided_views_gpu():
    b, n, heads, d = 2, 3136, 4, 64
    qkv = torch.randn(b, n, 3, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ref_qkv = qkv.detach().clone().requires_grad_()
    out = linear_attention(*_projection_views(qkv, heads, d), normalization="division", feature_map="elu1",
                           backend="auto")
    ref = linear_attention_torch(*_projection_views(ref_qkv, heads, d), normalization="division", feature_map="elu1")
    grad = torch.randn_like(ref).transpose(1, 2).contiguous().transpose(1, 2)   # a strided upstream grad
    out.backward(grad)
    ref.backward(grad)
    _close("out", out, ref, TOL[torch.bfloat16])
    _close("dqkv", qkv.grad, ref_qkv.grad, TOL[torch.bfloat16])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("layout", ["channels_first", "channels_last", "tokens_heads"])
def test_projection_layouts_gpu(layout, normalization, dtype):
    """q, k, v (and the key weights) as views of one projection output, as the models make them, at a model-sized
    shape: (B, 3C, H, W) conv outputs (token stride 1, or channels_last) and a (B, N, 3, H, d) linear output.
    Before the magnitude-aware and injective row sums of the q-side backward became ``[γ, 0…]ᵀ @ x`` products
    (jit.in_first_row), bf16 at d = 64 got dk and dw wrong here (6e-2 and 1.7 relative) or faulted (H100,
    triton 3.6); the suite's contiguous cases without key weights passed."""
    b, heads, d, side = 4, 4, 64, 56
    c, n = heads * d, side * side
    torch.manual_seed(0)
    if layout == "tokens_heads":
        src = torch.randn(b, n, 3, heads, d, device="cuda")
    else:
        src = torch.randn(b, 3 * c, side, side, device="cuda")
        if layout == "channels_last":
            src = src.contiguous(memory_format=torch.channels_last)
    w = (torch.rand(b, n, heads, device="cuda") + 0.5).transpose(1, 2)
    g = torch.randn(b, heads, n, d, device="cuda")
    check_projection_views(src, w, g, heads, d, dtype, TOL[dtype], normalization=normalization, feature_map="elu1",
                           scale=d ** -0.5)


@pytest.mark.cuda
def test_fp16_large_n_is_finite():
    """Unit-variance fp16 q, k, v at N = 262144 (512²): no inf/NaN forward or backward."""
    n = 262144
    q, k, v = (torch.randn(1, 1, n, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    grid = RopeGrid(rope_angle(64).cuda(), 512, 512)
    for normalization in NORMALIZATIONS:
        out = linear_attention(q, k, v, normalization=normalization, feature_map="elu1", scale=64 ** -0.5, rope=grid)
        out.backward(torch.randn_like(out))
        assert torch.isfinite(out).all(), normalization
        for t in (q, k, v):
            assert torch.isfinite(t.grad).all(), normalization
            t.grad = None
        ref = linear_attention_torch(q.detach(), k.detach(), v.detach(), normalization=normalization,
                                     feature_map="elu1", scale=64 ** -0.5, rope=grid)
        _close(normalization, out.detach(), ref, TOL[torch.float16])


@pytest.mark.cuda
def test_torch_compile_inductor():
    q, k, v, w, grid = _inputs(2, 4, 3136, 64, 64, torch.bfloat16, "elu1", True, True)
    opts = dict(normalization="division", feature_map="elu1", rope=grid)

    def loss(q, k, v, w):
        return linear_attention(q * 1.5, k, v, key_weights=w, **opts).float().pow(2).sum()

    tri_in = [t.clone().requires_grad_() for t in (q, k, v, w)]
    ref_in = [t.clone().requires_grad_() for t in (q, k, v, w)]
    torch.compile(loss, fullgraph=True)(*tri_in).backward()
    (linear_attention_torch(ref_in[0] * 1.5, *ref_in[1:3], key_weights=ref_in[3], **opts).float() ** 2).sum().backward()
    for name, a, r in zip(("dq", "dk", "dv", "dw"), tri_in, ref_in):
        _close(name, a.grad, r.grad, TOL[torch.bfloat16])


@pytest.mark.cuda
def test_auto_picks_triton_on_cuda(monkeypatch):
    from linvision.attn import ops
    calls = []
    real = ops.linear_attention_triton
    monkeypatch.setattr(ops, "linear_attention_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q = torch.randn(1, 2, 64, 32, device="cuda")
    linear_attention(q, q, q, backend="auto")
    assert calls == [1]
    # head dims over 128 fall back to the reference
    q = torch.randn(1, 1, 8, 160, device="cuda")
    linear_attention(q, q, q, backend="auto")
    assert calls == [1]


@pytest.mark.cuda
def test_direct_launch_repeated_and_misaligned_calls():
    """Calls after the first two launch the kept CompiledKernel directly (runtime.launch): new values,
    a q whose data pointer is not 16-byte aligned (another specialisation) and the aligned one again
    must all still equal the reference."""
    from linvision.attn.ops import runtime
    for i in range(4):
        check_against_reference(2, 3, 197, 64, 64, torch.bfloat16, "magnitude_aware", "elu1", weights=True, rope=True)
    if runtime.DIRECT_LAUNCH:
        assert runtime._COMPILED, "no kernel was kept for direct launches"
    b, h, n, d = 2, 3, 197, 64
    for offset in (1, 0, 1):
        flat = torch.randn(b * h * n * d + offset, device=DEVICE).abs().to(torch.bfloat16) + 0.1
        q = flat[offset:].view(b, h, n, d)
        k = torch.rand_like(q) + 0.1
        v = torch.randn_like(q)
        out = linear_attention(q, k, v, normalization="division", backend="triton")
        _close("out", out, linear_attention_torch(q, k, v, normalization="division"), TOL[torch.bfloat16])


def test_dependent_launch_policy(monkeypatch):
    """Second passes get the ``launch_pdl`` option and the PDL constexpr only on CUDA devices of sm_90+ with
    a Triton that has it; first passes get only the constexpr; never under the interpreter or on CPU."""
    from linvision.attn.ops import runtime
    if runtime.INTERPRETING:
        assert not runtime.DEPENDENT_LAUNCH
    monkeypatch.setattr(runtime, "DEPENDENT_LAUNCH", True)
    assert runtime.dependent_consts(torch.device("cpu"), second_pass=True) == {"PDL": False}
    if ON_GPU and torch.cuda.get_device_capability()[0] >= 9:
        dev = torch.device("cuda")
        assert runtime.dependent_consts(dev, second_pass=True) == {"PDL": True, "launch_pdl": True}
        assert runtime.dependent_consts(dev, second_pass=False) == {"PDL": True}
    monkeypatch.setattr(runtime, "DEPENDENT_LAUNCH", False)
    assert runtime.dependent_consts(torch.device("cuda"), second_pass=True) == {"PDL": False}


@pytest.mark.cuda
@pytest.mark.parametrize("dependent", [True, False], ids=["pdl", "serial"])
def test_dependent_launch_reads_this_calls_state(dependent, monkeypatch):
    """With the second passes launched as programmatic dependents, they start before the first pass ends:
    a missing wait would read the previous call's state (same shapes, so likely the same memory). New k, v
    on every call, eager and replayed from a CUDA graph, must each equal the reference. (v stays zero-mean:
    with |mean v| ≫ its spread the magnitude-aware output is a small difference of large bf16 terms.)"""
    from linvision.attn.ops import runtime
    if dependent and not runtime.dependent_launch(torch.device("cuda")):
        pytest.skip("no programmatic dependent launch here (needs sm_90+ and Triton >= 3.4)")
    monkeypatch.setattr(runtime, "DEPENDENT_LAUNCH", dependent)
    b, h, n, d = 2, 4, 3137, 64
    opts = dict(normalization="magnitude_aware", feature_map="elu1", scale=d ** -0.5)
    q, k, v, g = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def step():
        out = linear_attention(*leaves, backend="triton", **opts)
        return (out,) + torch.autograd.grad(out, leaves, g)

    def check(results):
        ref_in = [t.detach().clone().requires_grad_() for t in leaves]
        ref = linear_attention_torch(*ref_in, **opts)
        expected = (ref,) + torch.autograd.grad(ref, ref_in, g)
        for name, a, r in zip(("out", "dq", "dk", "dv"), results, expected):
            _close(name, a, r, TOL[torch.bfloat16])

    for i in range(3):
        with torch.no_grad():
            leaves[1].copy_(torch.randn_like(k) * (1 + i))
            leaves[2].copy_(torch.randn_like(v) * (1 + i))
        check(step())
    if dependent and runtime.DIRECT_LAUNCH:
        # The second passes' plans ask for launch_pdl, and the kernels they keep were compiled with it.
        from linvision.attn.ops.linear_attn_bwd import _KV_SIDE_PASSES
        from linvision.attn.ops.linear_attn_fwd import _OUTPUT_PASSES
        calls = [plan.call for plan in (*_OUTPUT_PASSES.values(), *_KV_SIDE_PASSES.values())
                 if plan.call.consts.get("launch_pdl") and plan.call.direct is not None]
        assert calls and all(call.direct.compiled.metadata.launch_pdl for call in calls)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for i in range(2):
        with torch.no_grad():
            leaves[1].copy_(torch.randn_like(k) + 0.5 * i)
            leaves[2].copy_(torch.randn_like(v) * (2 + i))
        graph.replay()
        check(captured)


@pytest.mark.cuda
def test_autotuned_configs_match_reference():
    """The suite runs one config per kernel (LINVISION_TRITON_AUTOTUNE=0, set above, read at import);
    this re-runs a cross-section (large bf16 shapes, dv ≠ d, every normalisation in fp16/bf16 at d = 32)
    with the full autotune sweep in a fresh process, so the configs the autotuner picks there (tile
    sizes, warps, pipeline depths) are checked against the reference."""
    selection = "test_large_shapes_bf16 or test_different_value_dim or test_every_normalization_low_precision"
    _rerun_in_fresh_process({"LINVISION_TRITON_AUTOTUNE": "1"}, selection)


def test_launch_specialisation_key():
    """The direct-launch cache key (runtime._specialisation) separates what Triton compiles for:
    dtypes and 16-byte alignment of pointers, ints by value; floats do not split it; the host functions'
    plan key (runtime.tensor_key) separates shapes, strides and alignment. Under the interpreter the direct
    launch is off (its launcher is not Triton's compiled one)."""
    from linvision.attn.ops import policy, runtime
    base = torch.zeros(64, dtype=torch.float16)
    aligned, misaligned = base[:32], base[1:33]
    key = runtime._specialisation((aligned, misaligned, base.float(), 48, 1, 0.5))
    assert key == ((torch.float16, True), (torch.float16, False), (torch.float32, True), 48, 1, None)
    assert runtime._specialisation((aligned, 2, 0.5)) != runtime._specialisation((aligned, 3, 0.5))
    assert runtime._specialisation((aligned, 2, 0.5)) == runtime._specialisation((aligned, 2, 0.25))
    # The per-pass plan key (runtime.tensor_key) separates layouts and alignment as well.
    t = torch.zeros(2, 3, 8, 16)
    assert runtime.tensor_key(t, None) == ((t.shape, t.stride(), torch.float32, t.device, True), None)
    assert runtime.tensor_key(t) != runtime.tensor_key(t.transpose(2, 3).contiguous().transpose(2, 3))
    assert runtime.tensor_key(base[:32]) != runtime.tensor_key(base[1:33])
    # Outputs take their input's layout: a dense one as it is, a view's as dense strides in its dim order.
    assert policy.layout_like(t) == t.stride() and policy.layout_like(t.transpose(1, 2)) == (384, 16, 128, 1)
    assert policy.layout_like(torch.zeros(2, 24, 8)[:, :16].view(2, 16, 2, 4).transpose(2, 3)) == (128, 8, 1, 4)
    assert [policy.block(d) for d in (1, 16, 17, 48, 96, 128)] == [16, 16, 32, 64, 128, 128]
    assert [policy.cdiv(a, 4) for a in (1, 4, 5, 8)] == [1, 1, 2, 2]
    if runtime.INTERPRETING:
        assert not runtime.DIRECT_LAUNCH


def test_tune_after_times_each_config_after_its_preceding_pass():
    """Second passes are tuned together with the pass they depend on (runtime.tune_after): every config is
    timed as ``preceding_pass(); kernel``, configs that cannot be built are skipped, the fastest is kept; a
    kernel whose autotuner resets buffers is refused (tune_after does not reset them)."""
    import triton
    from linvision.attn.ops import runtime
    events = []

    class FakeJit:
        __name__ = "fake_kernel"

        def __getitem__(self, grid):
            assert grid == "grid"
            return lambda *args, **kwargs: events.append(("kernel", args, kwargs["BN"], kwargs["X"]))

    class FakeAutotuned:
        configs = [triton.Config({"BN": bn}, num_warps=4) for bn in (64, 128, 256)]
        fn = FakeJit()
        reset_to_zero = []

    seconds = {64: 3.0, 128: 1.0, 256: 0.5}

    def bench(both):
        events.clear()
        both()
        assert events[0] == ("pass",) and events[1][:2] == ("kernel", ("t",)) and events[1][3] == 7
        if events[1][2] == 256:
            raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
        return seconds[events[1][2]]

    def preceding_pass():
        events.append(("pass",))
    best = runtime.tune_after(FakeAutotuned(), "grid", ("t",), {"X": 7}, preceding_pass, bench=bench)
    assert best.kwargs == {"BN": 128}

    FakeAutotuned.configs = FakeAutotuned.configs[2:]
    with pytest.raises(RuntimeError, match="no config of fake_kernel"):
        runtime.tune_after(FakeAutotuned(), "grid", ("t",), {"X": 7}, preceding_pass, bench=bench)
    FakeAutotuned.reset_to_zero = ["state_ptr"]
    with pytest.raises(ValueError, match="reset_to_zero"):
        runtime.tune_after(FakeAutotuned(), "grid", ("t",), {"X": 7}, preceding_pass, bench=bench)


def test_benchmark_value_check():
    """tools/benchmark_attn.value_check passes the Triton path and flags a wrong one (fp32, tiny shape)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "tools" / "benchmark_attn.py"
    spec = importlib.util.spec_from_file_location("_linvision_benchmark_attn", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    q, k, v, _, _ = _inputs(1, 2, 37, 16, 16, torch.float32, "elu1", False, False)
    g = torch.randn_like(v)
    opts = dict(normalization="division", feature_map="elu1")

    def reference(q, k, v):
        return linear_attention_torch(q, k, v, **opts)

    good = bench.value_check(lambda q, k, v: linear_attention(q, k, v, backend="triton", **opts), reference, q, k, v, g)
    assert good["value_check"] == "pass", good
    bad = bench.value_check(lambda q, k, v: 1.01 * reference(q, k, v), reference, q, k, v, g)
    assert bad["value_check"] == "FAIL" and bad["rel_err_out"] > 1e-3, bad
