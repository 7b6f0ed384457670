"""lipkern.certified_sigma: never below the exact SVD, within its stated margin of the
reference (the exact circular norms), differentiable by the implicit rule."""
import math

import pytest
import torch

import lipkern
from lipkern import ConvSpec
from lipkern.certified import CERT_MARGIN
from lipkern.reference import certified_sigma as ref_certified
from lipkern.reference import exact_sigma

# (weight shape, spec): every kind the op takes, odd sizes
CASES = [
    ((5, 7), None),
    ((1, 1), None),
    ((4, 3, 3, 3), None),  # reshaped kernel (matrix)
    ((4, 3, 3, 3), ConvSpec(6, padding=1)),
    ((4, 3, 3, 3), ConvSpec(7, stride=2, padding=1)),
    ((3, 2, 3, 3), ConvSpec(5, stride=3, padding=2)),
    ((4, 3, 1, 1), ConvSpec(6, stride=2)),
    ((4, 3, 3, 3), ConvSpec(6, padding=1, padding_mode="circular")),
    ((4, 3, 3, 3), ConvSpec(6, stride=2, padding=1, padding_mode="circular")),
    ((4, 3, 3, 3), ConvSpec(7, stride=2, padding=1, padding_mode="circular")),
    ((4, 3, 3, 3), ConvSpec(3, padding=2, padding_mode="circular")),
    ((4, 3, 3, 3), ConvSpec(5, padding=2, dilation=2)),
    ((6, 2, 3, 3), ConvSpec(5, padding=1, groups=3)),
    ((3, 4, 3, 3), ConvSpec(5, stride=2, padding=1, transposed=True, output_padding=1)),
    ((4, 3, 5), ConvSpec((1, 9), stride=(1, 3), padding=(0, 2))),
    ((4, 3, 2, 3), ConvSpec((5, 6), stride=(2, 3), padding=(1, 0), dilation=(2, 1))),
    ((4, 3, 3, 3), ConvSpec(2, padding=3)),
    ((2, 3, 4, 4), ConvSpec(8, stride=4)),
]
IDS = [f"{s}-{'dense' if c is None else c}" for s, c in CASES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,spec", CASES, ids=IDS)
def test_at_least_the_exact_norm_and_within_margin_of_reference(shape, spec, dtype):
    g = torch.Generator().manual_seed(hash((shape, str(spec))) % 2 ** 31)
    w = torch.randn(shape, generator=g, dtype=dtype)
    b = lipkern.certified_sigma([w], [spec], generator=torch.Generator().manual_seed(1))
    assert b.dtype == dtype and b.shape == (1,)
    exact = float(exact_sigma(w, spec))
    ref = float(ref_certified([w], [spec])[0])
    assert ref >= exact * (1 - 1e-12), (ref, exact)  # the circular restriction bounds it
    assert float(b[0]) >= exact, (float(b[0]), exact)  # certified: never below
    # within the certificate's margin of the exact circular norm (estimates converged), plus
    # the float32 error terms (c_n times a Perron root, mu's rounding): measured <= 8.2e-6
    # relative on these sizes
    assert float(b[0]) <= ref * math.sqrt(1 + CERT_MARGIN) * (1 + 5e-5), (float(b[0]), ref)
    print("excess", float(b[0]) / (ref * math.sqrt(1 + CERT_MARGIN)) - 1)


def test_exact_for_dense_and_divisible_circular_layers():
    torch.manual_seed(0)
    for w, s in [(torch.randn(6, 9, dtype=torch.float64), None),
                 (torch.randn(4, 3, 3, 3, dtype=torch.float64),
                  ConvSpec(8, stride=2, padding=1, padding_mode="circular"))]:
        ref = float(ref_certified([w], [s])[0])
        torch.testing.assert_close(ref, float(exact_sigma(w, s)), rtol=1e-10, atol=0)


def test_batched_layers_scale_and_zero():
    torch.manual_seed(1)
    ws = [torch.randn(4, 3, 3, 3), torch.zeros(5, 4), torch.randn(3, 3) * 1e-30,
          torch.randn(3, 3) * 1e30, torch.randn(4, 2, 3, 3).transpose(0, 1)]
    ss = [ConvSpec(5, padding=1), None, None, None, ConvSpec(4)]
    b = lipkern.certified_sigma(ws, ss)
    assert b.shape == (5,) and float(b[1]) == 0.0
    for i, (w, s) in enumerate(zip(ws, ss)):
        assert float(b[i]) >= float(exact_sigma(w, s)), i
        assert float(b[i]) <= float(ref_certified([w], [s])[0]) * 1.016 + 1e-300, i


def test_gradient_is_the_implicit_rule_and_matches_the_exact_sigma():
    """Where the bound is exact up to the margin (dense, circular), its gradient is the
    margin times the gradient of the exact sigma (autograd through the SVD)."""
    torch.manual_seed(2)
    for w, s in [(torch.randn(5, 4, dtype=torch.float64), None),
                 (torch.randn(3, 2, 3, 3, dtype=torch.float64),
                  ConvSpec(4, padding=1, padding_mode="circular"))]:
        w.requires_grad_(True)
        b = lipkern.certified_sigma([w], [s])[0]
        (gb,) = torch.autograd.grad(b, w)
        e = torch.linalg.matrix_norm(w, 2) if s is None else _circular_sigma(w, s)
        (ge,) = torch.autograd.grad(e, w)
        # the vectors come from power iteration (30 float64 steps on the best frequency):
        # measured agreement ~1e-7 relative; 1e-5 leaves room for slower gaps
        torch.testing.assert_close(gb, ge * (b.detach() / e.detach()), rtol=1e-5, atol=1e-7)


def _circular_sigma(w, s):
    """Differentiable exact circular-conv norm by the SVD of the FFT of the kernel."""
    n = s.input_size[0]
    k = torch.zeros(w.shape[0], w.shape[1], n, n, dtype=w.dtype)
    k = k + torch.nn.functional.pad(w, (0, n - w.shape[-1], 0, n - w.shape[-2]))
    a = torch.fft.fft2(k).permute(2, 3, 0, 1).reshape(-1, w.shape[0], w.shape[1])
    return torch.linalg.matrix_norm(a, 2).max()


def test_second_order_and_gradcheck():
    torch.manual_seed(3)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    s = ConvSpec(5, padding=1)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    # the value is piecewise (a certificate); its gradient is the implicit rule, linear in w
    (g,) = torch.autograd.grad(lipkern.certified_sigma([w], [s], generator=gen())[0], w,
                               create_graph=True)
    (g1,) = torch.autograd.grad(lipkern.certified_sigma([w], [s], generator=gen())[0], w)
    torch.testing.assert_close(g, g1)
    # s(W) = Re(u^H A(W) v) is linear in W (u, v constants): its second derivative is zero
    assert not g.requires_grad or torch.autograd.grad(g.sum(), w, allow_unused=True)[0] is None


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="weights must be a list"):
        lipkern.certified_sigma(torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"weights\[0\] contains NaN"):
        lipkern.certified_sigma([torch.full((2, 2), float("nan"))])
    with pytest.raises(ValueError, match="not implemented yet"):
        lipkern.certified_sigma([torch.randn(2, 2)], backend="cuda")
    with pytest.raises(ValueError, match="backend must be"):
        lipkern.certified_sigma([torch.randn(2, 2)], backend="bogus")
    with pytest.raises(ValueError, match=r"specs has 2 entries"):
        lipkern.certified_sigma([torch.randn(2, 2)], [None, None])


@pytest.mark.parametrize("k,d,s,p,n", [(3, 1, 1, 1, 4), (3, 1, 1, 1, 7), (3, 1, 2, 1, 8),
                                       (3, 1, 2, 1, 7), (1, 1, 2, 0, 8), (5, 2, 1, 4, 6),
                                       (4, 1, 4, 0, 8), (3, 2, 3, 2, 9), (2, 1, 1, 3, 2),
                                       (7, 1, 1, 3, 3), (3, 1, 1, 0, 5)])
def test_axis_embeds_the_zero_padded_layer(k, d, s, p, n):
    """One axis: the zero-padded strided correlation equals the polyphase circular one on
    the (smallest) grid _axis picks, read at the layer's outputs, for random taps and x."""
    from lipkern.certified.symbol import _axis
    out_len = (n + 2 * p - d * (k - 1) - 1) // s + 1
    phase, shift, nph, q, grid, mult = _axis(k, d, s, p, n, False, out_len)
    assert mult == 1 and grid <= -(-(n + 2 * p) // s)
    g = torch.Generator().manual_seed(k * 1000 + n)
    w, x = torch.randn(k, generator=g, dtype=torch.float64), torch.randn(n, generator=g,
                                                                       dtype=torch.float64)
    xp = torch.nn.functional.pad(x, (p, p))
    y = torch.stack([sum(w[j] * xp[s * o + d * j] for j in range(k)) for o in range(out_len)])
    phases = sorted({(d * j) % s for j in range(k)})
    xc = torch.zeros(nph, grid, dtype=torch.float64)  # the embedded input, by phase
    for i in range(n):
        t = i + p
        if t % s in phases:
            xc[phases.index(t % s), (t // s) % grid] += x[i]
    yc = torch.stack([sum(w[j] * xc[phase[j], (o + shift[j]) % grid] for j in range(k))
                      for o in range(out_len)])
    torch.testing.assert_close(yc, y, rtol=0, atol=1e-12)


def test_smallest_grid_of_same_convs():
    """A "same" 3x3 conv on n x n embeds on (n + 1) x (n + 1): fewer frequencies."""
    from lipkern.certified import symbol
    from lipkern.certified.symbol import frequencies
    from lipkern.spec import resolve_geometry
    for n in (4, 8, 32):
        sym = symbol(torch.randn(2, 2, 3, 3), resolve_geometry((2, 2, 3, 3),
                                                                ConvSpec(n, padding=1), "w"))
        assert sym.grid == (n + 1, n + 1)
        assert len(frequencies(sym.grid)) == ((n + 1) ** 2 + (4 if n % 2 else 1)) // 2


@pytest.mark.skipif(not hasattr(torch.ops.lipkern, "certify_frequencies"),
                    reason="lipkern._C without csrc/cpu/certified.cpp")
@pytest.mark.parametrize("is_gram", [False, True])
def test_cpp_certificate_step_against_torch(is_gram):
    """The C++ step (lower GEMM, potrf, Perron bounds) against the ATen step on the same
    matrices: same success pattern, Perron bounds >= the exact Perron roots (eigvalsh)."""
    import importlib
    cert = importlib.import_module("lipkern.certified.certify")
    g = torch.Generator().manual_seed(7)
    n, m = 37, 53
    b = torch.randn(6, n, m, dtype=torch.complex64, generator=g)
    side = b @ b.mH if is_gram else b
    lam = torch.linalg.eigvalsh((b @ b.mH).to(torch.complex128)).amax(-1)
    mu = (lam * torch.tensor([1.1, 1.1, 0.9, 1.5, 0.5, 1.01], dtype=torch.float64)).float()
    info_c, pl_c, pb_c = cert._step(side, is_gram, mu, True)
    info_t, pl_t, pb_t = cert._step(side, is_gram, mu, False)
    assert ((info_c == 0) == (info_t == 0)).all() and ((info_c == 0) == (mu.double() > lam)).all()
    s = -(b @ b.mH).to(torch.complex128)
    s.diagonal(dim1=-2, dim2=-1).add_(mu.double()[:, None])
    for i in range(6):
        if info_c[i] == 0:
            la = torch.linalg.cholesky(s[i]).abs()
            exact = torch.linalg.eigvalsh(la.mT @ la).max()
            assert exact <= pl_c[i] <= exact * 1.2, (i, float(exact), float(pl_c[i]))
            assert exact <= pl_t[i] * (1 + 1e-5)
    if not is_gram:
        exact_b = torch.linalg.eigvalsh(b.abs().double() @ b.abs().double().mT).amax(-1)
        assert (pb_c >= exact_b).all() and (pb_c <= exact_b * 1.01).all()
        assert (pb_t >= exact_b * (1 - 1e-5)).all()


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_backends_bound_a_resnet_stage(backend):
    """Layers as ResNet-18 has them (3x3 same, 3x3 stride 2, 1x1 stride 2) with both
    certificate steps: >= the exact operator norm, within 1.2x of it."""
    if backend == "cpp" and not hasattr(torch.ops.lipkern, "certify_frequencies"):
        pytest.skip("lipkern._C without csrc/cpu/certified.cpp")
    g = torch.Generator().manual_seed(11)
    ws = [torch.randn(24, 16, 3, 3, generator=g), torch.randn(24, 24, 3, 3, generator=g),
          torch.randn(24, 16, 1, 1, generator=g)]
    # the smallest spatial size of ResNet-18 (4x4): there the circular embedding is loosest,
    # 1.12-1.14x on ResNet-18's 512-channel layers (bench_bound), 1.11 here
    ss = [ConvSpec(8, stride=2, padding=1), ConvSpec(4, padding=1), ConvSpec(8, stride=2)]
    b = lipkern.certified_sigma(ws, ss, backend=backend, generator=torch.Generator().manual_seed(0))
    for i, (w, s) in enumerate(zip(ws, ss)):
        exact = float(exact_sigma(w, s))
        assert exact <= float(b[i]) <= 1.2 * exact, (i, exact, float(b[i]))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1.0, 1e20, 1e30])
def test_extreme_scales_every_path(backend, scale):
    """The complex64 Gram and Cholesky run on taps scaled by a power of two: a conv on the
    frequency path (3x3, many channels), one on the spatial path (stride 2) and a dense
    layer, at every scale: >= exact, within 1.2x, the same relative value at every scale."""
    if backend == "cpp" and not hasattr(torch.ops.lipkern, "certify_frequencies"):
        pytest.skip("lipkern._C without csrc/cpu/certified.cpp")
    g = torch.Generator().manual_seed(5)
    base = [torch.randn(40, 40, 3, 3, generator=g), torch.randn(8, 6, 3, 3, generator=g),
            torch.randn(7, 5, generator=g)]
    ss = [ConvSpec(4, padding=1), ConvSpec(6, stride=2, padding=1), None]
    from lipkern.certified.gram import choose_path  # the first layer takes the frequency path
    assert choose_path(9, 13, 40, 25, backend == "cpp") == "frequency"
    ws = [w * scale for w in base]
    b = lipkern.certified_sigma(ws, ss, backend=backend, generator=torch.Generator().manual_seed(0))
    b1 = lipkern.certified_sigma(base, ss, backend=backend,
                                 generator=torch.Generator().manual_seed(0))
    for i, (w, s) in enumerate(zip(base, ss)):
        exact = float(exact_sigma(w.double(), s)) * scale
        assert exact <= float(b[i]) <= 1.2 * exact, (i, exact, float(b[i]))
        # power-of-two scaling is exact: only the float32 output rounding differs
        assert float(b[i]) / scale == pytest.approx(float(b1[i]), rel=1e-6)


def _interpreting():
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 on the CPU")
@pytest.mark.parametrize("shape,groups", [((5, 3, 3, 3), 1), ((6, 2, 3, 2), 3), ((1, 1, 1, 1), 1)])
def test_triton_phase_sum_against_aten(shape, groups):
    """The Triton kernel's A_f (poisoned output) against the ATen einsum, odd shapes."""
    pytest.importorskip("triton")
    from lipkern.certified.symbol import frequencies, phase_angles
    from lipkern.triton_kernels.certified import phase_sum
    g = torch.Generator().manual_seed(3)
    co, ci, qh, qw = shape
    taps = torch.randn(groups, co, ci, qh, qw, generator=g, dtype=torch.float64)
    grid = (5, 4)
    freqs = frequencies(grid)
    ang = phase_angles(freqs, grid, qh, qw, "cpu")
    a = phase_sum(taps.float().reshape(groups, co, ci, qh * qw).contiguous(), ang)
    ref = torch.einsum("gocq,fq->gfoc", taps.reshape(groups, co, ci, qh * qw).to(torch.complex128),
                       torch.exp(1j * ang.to(torch.complex128)))
    assert a.dtype == torch.complex64 and a.shape == ref.shape
    torch.testing.assert_close(a.to(torch.complex128), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 on the CPU")
def test_triton_backend_bounds_like_torch():
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(4)
    ws = [torch.randn(40, 40, 3, 3, generator=g), torch.randn(8, 6, 3, 3, generator=g)]
    ss = [ConvSpec(4, padding=1), ConvSpec(6, stride=2, padding=1)]
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    bt = lipkern.certified_sigma(ws, ss, backend="triton", generator=gen())
    bo = lipkern.certified_sigma(ws, ss, backend="torch", generator=gen())
    for i, (w, s) in enumerate(zip(ws, ss)):
        exact = float(exact_sigma(w, s))
        assert exact <= float(bt[i]) <= 1.2 * exact
    torch.testing.assert_close(bt, bo, rtol=1e-5, atol=0)  # one estimate, same certificate


def test_triton_backend_refuses_cpu_tensors_without_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        lipkern.certified_sigma([torch.randn(3, 3)], backend="triton")


# ---------------------------------------------------------------- the C++ layer op
_LAYER_OP = pytest.mark.skipif(not hasattr(torch.ops.lipkern, "certify_layer"),
                               reason="lipkern._C without certify_layer")
# polyphase layers whose column blocks are formed once per key (left, H = A A^H), the same
# with more channels out than in (right: one block), grouped, 4x4 and 1-D kernels
BLOCK_CASES = [
    ((16, 8, 3, 3), ConvSpec(8, stride=2, padding=1)),
    ((24, 8, 4, 4), ConvSpec(8, stride=2, padding=1)),
    ((32, 4, 3, 3), ConvSpec(8, stride=2, padding=1)),
    ((12, 4, 3, 3), ConvSpec(9, stride=2, padding=1, groups=2)),
    ((4, 12, 3, 3), ConvSpec(6, stride=3, padding=1)),
    ((12, 4, 3, 1), ConvSpec((7, 5), stride=2, padding=(1, 0))),
    ((8, 4, 3, 3), ConvSpec(8, stride=2, padding=1, padding_mode="circular")),
    ((16, 16, 3, 3), ConvSpec(4, padding=1)),
]


@_LAYER_OP
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,spec", BLOCK_CASES, ids=[str(c) for c in BLOCK_CASES])
def test_layer_op_blocks_against_reference_and_torch(shape, spec, dtype):
    """certify_layer (blocks cached per key, conjugate keys, trace bounds) >= the exact SVD
    and the exact circular norm, within the margin plus its float32 terms, and next to the
    ATen path."""
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=g, dtype=dtype)
    cpp = float(lipkern.certified_sigma([w], [spec], backend="cpp",
                                        generator=torch.Generator().manual_seed(1))[0])
    ato = float(lipkern.certified_sigma([w], [spec], backend="torch",
                                        generator=torch.Generator().manual_seed(1))[0])
    ref = float(ref_certified([w], [spec])[0])
    assert cpp >= float(exact_sigma(w, spec)) and cpp >= ref * (1 - 1e-12)
    assert cpp <= ref * math.sqrt(1 + CERT_MARGIN) * (1 + 2e-3), (cpp, ref)
    assert abs(cpp / ato - 1) < 0.02, (cpp, ato)


@_LAYER_OP
def test_layer_op_retries_when_the_estimates_are_low(monkeypatch):
    """One Lanczos step on the smallest-trace frequency only: the first trial is far too low,
    so frequencies fail and retry (own estimates, larger trials); the bound still holds and
    converges to the margin."""
    import sys
    cert_mod = sys.modules["lipkern.certified.certify"]  # (the package's `certify` is a function)
    monkeypatch.setattr(cert_mod, "LANCZOS_STEPS", 1)
    monkeypatch.setattr(cert_mod, "ESTIMATE_TOP", 1)
    torch.manual_seed(3)
    for w, s in [(torch.randn(16, 8, 3, 3), ConvSpec(6, padding=1)),
                 (torch.randn(16, 8, 3, 3), ConvSpec(8, stride=2, padding=1))]:
        b = float(lipkern.certified_sigma([w], [s], backend="cpp")[0])
        ref = float(ref_certified([w], [s])[0])
        assert ref * (1 - 1e-12) <= b <= ref * 1.2, (b, ref)


@_LAYER_OP
def test_tap_major_matches_the_float64_symbol_and_reuses_its_workspace():
    """The C++ taps (into the per-thread workspace) equal the float64 symbol rounded once,
    for float32 and float64 weights at extreme scales; a smaller layer between two calls
    leaves no stale entries (the polyphase zeros are rewritten)."""
    from lipkern.certified.symbol import symbol, tap_major32
    from lipkern.spec import resolve_geometry
    cases = [((8, 4, 3, 3), ConvSpec(8, stride=2, padding=1)), ((3, 2, 1, 1), ConvSpec(4)),
             ((8, 4, 3, 3), ConvSpec(8, stride=2, padding=1)),
             ((6, 4, 3, 3), ConvSpec(9, stride=2, padding=1, groups=2)),
             ((8, 4, 5, 5), ConvSpec(6, padding=2, padding_mode="circular"))]
    for dt in (torch.float32, torch.float64):
        for scale_w, scale in [(1.0, 0.5), (1e30, 2.0 ** -100), (1e-30, 2.0 ** 99)]:
            for shape, spec in cases:
                w = torch.randn(shape, dtype=dt) * scale_w
                geom = resolve_geometry(shape, spec, "w")
                t = tap_major32(w, geom, scale)
                ref = symbol(w, geom).taps * scale
                gr, co, ci, qh, qw = ref.shape
                ref = ref.to(torch.float32).reshape(gr, co * ci, qh * qw).transpose(1, 2)
                assert torch.equal(t, ref.reshape(gr, qh * qw, co, ci)), (shape, dt, scale)


@_LAYER_OP
def test_layer_op_from_two_python_threads():
    """Per-thread buffers: two threads certifying different layers at once get the serial
    results."""
    import threading
    torch.manual_seed(4)
    jobs = [([torch.randn(16, 8, 3, 3)], [ConvSpec(8, stride=2, padding=1)]),
            ([torch.randn(8, 8, 3, 3)], [ConvSpec(6, padding=1)])]
    serial = [lipkern.certified_sigma(w, s, generator=torch.Generator().manual_seed(0))
              for w, s in jobs]
    out = [None, None]

    def run(i):
        for _ in range(5):
            out[i] = lipkern.certified_sigma(*jobs[i], generator=torch.Generator().manual_seed(0))

    th = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    [t.start() for t in th]
    [t.join() for t in th]
    for a, b in zip(out, serial):
        assert torch.equal(a, b)


@_LAYER_OP
@pytest.mark.parametrize("ch", [30, 64, 127, 128, 130, 256])
def test_layer_op_cholesky_paths_and_lowered_trial(ch):
    """n <= 128: the op's own Cholesky (cholesky_lower); above: LAPACK; 128 < n <= ~360: the
    first trial lowered by the Frobenius term of |L| (trial_below). Each is >= the exact
    circular norm (the reference's SVD per frequency) and within the margin plus its float32
    terms of it; the float32 factorization agrees with the float64 one on which matrices are
    positive definite (same bound as the ATen path within the margin)."""
    g = torch.Generator().manual_seed(ch)
    w = torch.randn(ch, ch, 3, 3, generator=g) / ch
    spec = ConvSpec(4, padding=1)
    cpp = float(lipkern.certified_sigma([w], [spec], backend="cpp",
                                        generator=torch.Generator().manual_seed(1))[0])
    ref = float(ref_certified([w], [spec])[0])
    assert ref * (1 - 1e-12) <= cpp <= ref * math.sqrt(1 + CERT_MARGIN) * (1 + 5e-3), (cpp, ref)
    ato = float(lipkern.certified_sigma([w], [spec], backend="torch",
                                        generator=torch.Generator().manual_seed(1))[0])
    assert abs(cpp / ato - 1) < 0.02, (cpp, ato)


@_LAYER_OP
def test_layer_op_bound_does_not_depend_on_the_thread_count(monkeypatch):
    """Frequencies whose first trial fails are retried together at one trial per round, so
    the bound is the same with 1 and 2 threads (with one retry raising a shared trial it
    depended on which thread met which frequency first). Forced retries: one Lanczos step on
    one frequency."""
    import sys
    cert_mod = sys.modules["lipkern.certified.certify"]
    monkeypatch.setattr(cert_mod, "LANCZOS_STEPS", 1)
    monkeypatch.setattr(cert_mod, "ESTIMATE_TOP", 1)
    torch.manual_seed(5)
    ws = [torch.randn(32, 32, 3, 3), torch.randn(48, 24, 3, 3), torch.randn(160, 160, 3, 3)]
    specs = [ConvSpec(12, padding=1), ConvSpec(10, stride=2, padding=1), ConvSpec(4, padding=1)]
    threads = torch.get_num_threads()
    try:
        out = []
        for nt in (1, 2, 1, 2):
            torch.set_num_threads(nt)
            out.append(lipkern.certified_sigma(ws, specs, backend="cpp",
                                               generator=torch.Generator().manual_seed(0)))
    finally:
        torch.set_num_threads(threads)
    for o in out[1:]:
        assert torch.equal(o, out[0]), (o, out[0])
    ref = ref_certified(ws, specs)
    assert bool((out[0].double() >= ref * (1 - 1e-12)).all())
    assert bool((out[0].double() <= ref * 1.2).all())
