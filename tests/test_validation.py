"""Bad input: a clear ValueError/TypeError naming the argument, never a wrong number."""
import pytest
import torch

import lipkern
from lipkern import ConvSpec

W = torch.randn(4, 3)
K = torch.randn(4, 3, 3, 3)


def call(*args, **kw):
    return lipkern.fused_power_iter(*args, **kw)


@pytest.mark.parametrize("weights,exc,match", [
    ([], ValueError, "weights is empty"),
    (W, TypeError, "weights must be a list"),
    ([W, "x"], TypeError, r"weights\[1\] must be a torch.Tensor"),
    ([torch.randn(4)], ValueError, r"weights\[0\] has 1 dims"),
    ([torch.randn(2, 2, 2, 2, 2)], ValueError, r"weights\[0\] has 5 dims"),
    ([torch.ones(3, 3, dtype=torch.int64)], TypeError, r"weights\[0\] has dtype torch.int64"),
    ([torch.zeros(0, 3)], ValueError, r"weights\[0\] is empty"),
    ([W, W.double()], TypeError, r"weights\[1\] has dtype torch.float64 but weights\[0\]"),
    ([W, torch.tensor([[float("nan")]])], ValueError, r"weights\[1\] contains NaN or Inf"),
    ([torch.tensor([[float("inf"), 1.0]])], ValueError, r"weights\[0\] contains NaN or Inf"),
])
def test_bad_weights(weights, exc, match):
    with pytest.raises(exc, match=match):
        call(weights)


def test_mixed_devices():
    meta = torch.randn(3, 3, device="meta")
    with pytest.raises(ValueError, match=r"weights\[1\] is on meta but weights\[0\] is on cpu"):
        call([W, meta])


@pytest.mark.parametrize("specs,exc,match", [
    ([None], ValueError, "specs has 1 entries but weights has 2"),
    (ConvSpec(5), TypeError, "specs must be None or a list"),
    ([None, "conv"], TypeError, r"specs\[1\] must be None or a lipkern.ConvSpec"),
    ([ConvSpec(5), None], ValueError, r"weights\[0\] is a 2-D \(dense\) weight"),
    ([None, ConvSpec(2)], ValueError, r"weights\[1\]: ConvSpec.input_size \(2, 2\).*smaller"),
    ([None, ConvSpec(5, groups=3)], ValueError, r"weights\[1\]: dim 0 \(4\) is not divisible"),
    ([None, ConvSpec(5, padding="same", stride=2)], ValueError, "padding='same' needs stride 1"),
    ([None, ConvSpec(2, padding=3, padding_mode="circular")], ValueError,
     "circular padding .* larger than the input"),
    ([None, ConvSpec(1, padding=2, transposed=True)], ValueError, "empty transposed-conv"),
])
def test_bad_specs(specs, exc, match):
    with pytest.raises(exc, match=match):
        call([W, K], specs)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(input_size=0), ValueError, "input_size must be >= 1"),
    (dict(input_size=4, stride=0), ValueError, "stride must be >= 1"),
    (dict(input_size=4, padding=-1), ValueError, "padding must be >= 0"),
    (dict(input_size=4, padding="full"), ValueError, "padding must be an int"),
    (dict(input_size=(4, 4, 4)), TypeError, "input_size must be an int or a pair"),
    (dict(input_size=4.0), TypeError, "input_size must be an int or a pair"),
    (dict(input_size=4, groups=0), ValueError, "groups must be a positive int"),
    (dict(input_size=4, padding_mode="reflect"), ValueError, "padding_mode='reflect'"),
    (dict(input_size=4, padding_mode="circular", transposed=True), ValueError,
     "transposed convolutions support padding_mode='zeros'"),
    (dict(input_size=4, output_padding=1), ValueError, "output_padding is only meaningful"),
    (dict(input_size=4, output_padding=2, stride=2, transposed=True), ValueError,
     "output_padding .* must be smaller than stride"),
])
def test_bad_convspec(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ConvSpec(**kwargs)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(n_iters=-1), ValueError, "n_iters must be an int >= 0"),
    (dict(n_iters=2.0), ValueError, "n_iters must be an int >= 0"),
    (dict(eps=0.0), ValueError, "eps must be a finite float > 0"),
    (dict(eps=float("nan")), ValueError, "eps must be a finite float > 0"),
    (dict(tol=-1e-3), ValueError, "tol must be None or a finite float >= 0"),
    (dict(backend="jax"), ValueError, "backend must be one of"),
    (dict(generator=0), TypeError, "generator must be a torch.Generator"),
    (dict(state="warm"), TypeError, "state must be the .state of an earlier"),
    (dict(variant="torch"), ValueError, "variant must be one of"),
    (dict(variant="spectral_norm", tol=1e-3), ValueError, "tol is not supported with"),
])
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        call([W], **kwargs)


def test_state_for_other_layers_is_refused():
    st = call([W]).state
    with pytest.raises(ValueError, match="state was computed for different layers"):
        call([W.t().contiguous()], state=st)


def test_state_with_wrong_vector_sizes_is_refused():
    st = call([W]).state
    bad = lipkern.PowerIterState(st.x, st.u[:-1], st.meta)
    with pytest.raises(ValueError, match="state.x / state.u must have shapes"):
        call([W], state=bad, variant="spectral_norm")


def test_unavailable_backends_say_what_is_missing(monkeypatch):
    with pytest.raises(lipkern.BackendUnavailableError, match="backend='cuda' is not available"):
        call([W], backend="cuda")  # CPU tensors (or no CUDA build)
    monkeypatch.setattr(lipkern.backends, "load_ext", lambda: None)
    with pytest.raises(lipkern.BackendUnavailableError,
                       match="backend='cpp' is not available: the compiled extension"):
        call([W], backend="cpp")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="Triton kernels need CUDA tensors, or TRITON_INTERPRET=1"):
        call([W], backend="triton")


def test_triton_refuses_float64(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="float64 weights need 'torch'"):
        call([W.double()], backend="triton")


def test_exact_sigma_bad_input():
    with pytest.raises(ValueError, match="w must be a 2-D, 3-D or 4-D tensor"):
        lipkern.reference.exact_sigma(torch.randn(3))


def test_import_and_torch_backend_work_without_triton():
    """`import lipkern` needs only torch; asking for triton then says what is missing."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, lipkern\n"
            "r = lipkern.fused_power_iter([torch.randn(4, 3)], backend='auto')\n"
            "assert r.sigmas.shape == (1,)\n"
            "lipkern.backends._HAS_TRITON = lipkern.backends._UNSET\n"
            "import importlib.util as u; u.find_spec = lambda name, *a: None\n"
            "try:\n"
            "    lipkern.fused_power_iter([torch.randn(4, 3)], backend='triton')\n"
            "except lipkern.BackendUnavailableError as e:\n"
            "    assert 'Triton is not installed' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('no error')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
