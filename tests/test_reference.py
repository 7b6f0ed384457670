"""The reference against the exact SVD, torch built-ins and fp64 gradcheck."""
import pytest
import torch
import torch.nn.functional as F

import lipkern
from lipkern import ConvSpec
from lipkern import reference as ref
from lipkern.spec import resolve_geometry

from layers import MIXED, make_weights


def _operator_matrix(w, spec):
    """Dense matrix of the layer's operator A, differentiable in w (built independently of
    the reference's conv form where torch offers the op: conv2d/conv_transpose2d directly)."""
    if spec is None:
        return w.reshape(w.shape[0], -1)
    w4 = w if w.dim() == 4 else w.unsqueeze(2)
    hw = spec.input_size if w.dim() == 4 else (1, spec.input_size[1])
    cin = w4.shape[0] if spec.transposed else w4.shape[1] * spec.groups
    n = cin * hw[0] * hw[1]
    eye = torch.eye(n, dtype=w.dtype).reshape(n, cin, *hw)
    s, d, p = spec.stride, spec.dilation, spec.padding
    if w.dim() == 3:
        s, d, p = (1, s[1]), (1, d[1]), (0, p[1])
    if spec.transposed:
        out = F.conv_transpose2d(eye, w4, stride=s, padding=p, groups=spec.groups, dilation=d,
                                 output_padding=spec.output_padding if w.dim() == 4
                                 else (0, spec.output_padding[1]))
    else:
        if spec.padding_mode == "circular":
            eye = F.pad(eye, (p[1], p[1], p[0], p[0]), mode="circular")
            p = 0
        out = F.conv2d(eye, w4, stride=s, padding=p, dilation=d, groups=spec.groups)
    return out.reshape(n, -1).t()


@pytest.mark.parametrize("entry", MIXED, ids=[str(i) for i in range(len(MIXED))])
def test_exact_sigma_matches_torch_operator_norm(entry):
    (w,), (spec,) = make_weights([entry], torch.float64, seed=1)
    want = torch.linalg.matrix_norm(_operator_matrix(w, spec), 2)
    torch.testing.assert_close(ref.exact_sigma(w, spec), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("entry", MIXED, ids=[str(i) for i in range(len(MIXED))])
def test_adjoint_is_transpose(entry):
    """<A x, y> == <x, A^T y> for every layer kind (fp64, random x, y)."""
    (w,), (spec,) = make_weights([entry], torch.float64, seed=2)
    g = resolve_geometry(tuple(w.shape), spec, "w")
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(g.x_numel, generator=gen, dtype=torch.float64)
    y = torch.randn(g.y_numel, generator=gen, dtype=torch.float64)
    lhs = torch.dot(ref.apply_op(g, w, x), y)
    rhs = torch.dot(x, ref.apply_adjoint(g, w, y))
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_reference_converges_to_exact_sigma_from_below():
    ws, specs = make_weights(MIXED, torch.float64, seed=4)
    gen = torch.Generator().manual_seed(0)
    exact = torch.stack([ref.exact_sigma(w, s) for w, s in zip(ws, specs)])
    few = ref.power_iter(ws, specs, n_iters=2, generator=gen).sigmas
    assert (few <= exact * (1 + 1e-12)).all()
    many = ref.power_iter(ws, specs, n_iters=20000, tol=1e-15, generator=gen).sigmas
    torch.testing.assert_close(many, exact, rtol=1e-6, atol=0)


def test_reshaped_sigma_is_torchs_choice():
    """spec=None on a conv kernel is torch's spectral_norm sigma: the reshaped matrix norm."""
    (w,), _ = make_weights([((8, 4, 3, 3), None)], torch.float64)
    got = ref.power_iter([w], n_iters=300, generator=torch.Generator().manual_seed(0)).sigmas
    torch.testing.assert_close(got[0], torch.linalg.matrix_norm(w.reshape(8, -1), 2))


def test_grouped_conv_sigma_is_max_over_groups():
    (w,), _ = make_weights([((6, 2, 3, 3), None)], torch.float64, seed=5)
    spec = ConvSpec(5, padding=1, groups=3)
    per_group = [ref.exact_sigma(w[2 * j:2 * j + 2], ConvSpec(5, padding=1)) for j in range(3)]
    torch.testing.assert_close(ref.exact_sigma(w, spec), torch.stack(per_group).max())


def test_operator_norm_differs_from_reshaped_norm():
    """DESIGN.md's point: the reshaped kernel's sigma is not the conv's Lipschitz constant."""
    (w,), _ = make_weights([((8, 8, 3, 3), None)], torch.float64, seed=6)
    op = float(ref.exact_sigma(w, ConvSpec(8, padding=1)))
    mat = float(ref.exact_sigma(w))
    assert abs(op - mat) / op > 0.1


# Layers whose top singular value is simple (circular convs and 1x1 convs on tiny inputs have
# repeated top singular values, where sigma has no unique gradient).
GRAD_ENTRIES = [MIXED[0], MIXED[3], MIXED[4], MIXED[5], MIXED[6], MIXED[8], MIXED[10]]


@pytest.mark.parametrize("entry", GRAD_ENTRIES, ids=lambda e: str(e[0]))
def test_gradient_matches_autograd_through_matrix_norm(entry):
    """At convergence the implicit gradient u x^T is the gradient of the exact sigma."""
    (w,), (spec,) = make_weights([entry], torch.float64, seed=7)
    w1 = w.clone().requires_grad_()
    sv = torch.linalg.svdvals(_operator_matrix(w1, spec))
    assert sv[1] < 0.999 * sv[0], "precondition: a simple top singular value"
    sv[0].backward()
    w2 = w.clone().requires_grad_()
    # the error of x shrinks like (s2/s1)^(2k): 0.9987^(2*20000) ~ 1e-23
    ref.power_iter([w2], [spec], n_iters=20000,
                   generator=torch.Generator().manual_seed(0)).sigmas.sum().backward()
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-7, atol=1e-10)


def test_gradcheck_reference_fp64():
    entries = [((4, 3), None), ((2, 2, 2, 2), ConvSpec(3, padding=1)),
               ((2, 3, 2, 2), ConvSpec(2, stride=2, transposed=True))]
    ws, specs = make_weights(entries, torch.float64, seed=8)

    def f(*ws):
        r = ref.power_iter(list(ws), specs, n_iters=300, generator=torch.Generator().manual_seed(0))
        return r.sigmas, r.lipschitz, r.log_lipschitz

    assert torch.autograd.gradcheck(f, [w.requires_grad_() for w in ws], atol=1e-6, rtol=1e-4)


def test_product_and_log_product():
    ws, specs = make_weights(MIXED[:6], torch.float64, seed=9)
    r = ref.power_iter(ws, specs, n_iters=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(r.lipschitz, torch.prod(r.sigmas))
    torch.testing.assert_close(r.log_lipschitz, torch.log(r.sigmas).sum())


def test_log_lipschitz_does_not_overflow_float32():
    ws = [torch.eye(4) * 10 for _ in range(100)]
    r = lipkern.fused_power_iter(ws, n_iters=1, backend="torch")
    assert torch.isinf(r.lipschitz)  # 10^100 overflows float32
    torch.testing.assert_close(r.log_lipschitz, torch.tensor(100 * torch.log(torch.tensor(10.)).item()))


def test_exact_sigma_refuses_huge_operators():
    with pytest.raises(ValueError, match="EXACT_MAX_ELEMENTS"):
        ref.exact_sigma(torch.randn(64, 64, 3, 3), ConvSpec(128, padding=1))
