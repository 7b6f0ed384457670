"""lipkern.nn.spectral_norm_model against per-layer spectral_norm (torch's and lipkern's)."""
import copy
import io

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm as torch_sn

import lipkern
from lipkern.nn import remove_spectral_norm_model, spectral_norm_model

CPU_BACKENDS = ["torch", "cpp", "triton"]
# (backend, strategy): every backend with the scaled-output layers, and the fused-weights
# strategy (one launch writes every W / sigma), which needs the Triton op
CPU_PATHS = [(b, "scaled_outputs") for b in CPU_BACKENDS] + [("triton", "fused_weights")]


def _backend_ok(backend):
    why = lipkern.backends._why_not(backend, torch.device("cpu"), torch.float32)
    if why:
        pytest.skip(why)


def _net(seed=0, transposed=False):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
              nn.Conv2d(6, 4, 3, stride=2, padding=1, padding_mode="circular"), nn.ReLU()]
    if transposed:
        layers += [nn.ConvTranspose2d(4, 5, 2, stride=2), nn.ReLU()]
        flat = 5 * 8 * 8
    else:
        flat = 4 * 4 * 4
    layers += [nn.Flatten(), nn.Linear(flat, 7), nn.Tanh(), nn.Linear(7, 3, bias=False)]
    return nn.Sequential(*layers)


def _per_layer_torch(model, types, **kw):
    torch.manual_seed(1)  # the same draws, in model order, as spectral_norm_model below
    for m in model.modules():
        if isinstance(m, types):
            torch_sn(m, **kw)
    return model


def _ours(model, **kw):
    torch.manual_seed(1)
    return spectral_norm_model(model, **kw)


def _train(model, steps=3, seed=5, two_forwards=False, device="cpu"):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed)
    outs = []
    for _ in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=g).to(device)
        opt.zero_grad()
        y = model(x)
        loss = y.square().mean() + (model(-x).sum() if two_forwards else 0)
        loss.backward()
        outs.append((y.detach().clone(), [p.grad.clone() for p in model.parameters()]))
        opt.step()
    return outs


def _buffers(model):
    return {k: v for k, v in model.state_dict().items() if k.endswith(("_u", "_v"))}


def _assert_eval_matches(got_m, want_m, x):
    """In eval mode: the same output as torch's model, no vector updated, and the last
    layer's normalized weight read outside a forward equal to torch's."""
    want_m.eval()
    got_m.eval()
    before = {k: v.clone() for k, v in _buffers(got_m).items()}
    torch.testing.assert_close(got_m(x), want_m(x), rtol=1e-4, atol=1e-5)
    for k, v in _buffers(got_m).items():  # eval does not update
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    torch.testing.assert_close(got_m[-1].weight, want_m[-1].weight, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "conv_transpose"])
@pytest.mark.parametrize("backend,strategy", CPU_PATHS)
def test_matches_torch_per_layer_spectral_norm(backend, strategy, transposed):
    """Outputs, gradients of every parameter and the vectors over 3 training steps, then an
    eval forward; the same state_dict keys. Tolerances: float32 rounding of different orders
    of summation, compounded over 16 warm-up iterations (measured <= 2e-6 absolute on the
    unit vectors here)."""
    _backend_ok(backend)
    types = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)
    want_m = _per_layer_torch(_net(transposed=transposed), types)
    got_m = _ours(_net(transposed=transposed), types=types, backend=backend, strategy=strategy)
    assert set(got_m.state_dict()) == set(want_m.state_dict())
    for k, v in _buffers(want_m).items():
        torch.testing.assert_close(_buffers(got_m)[k], v, rtol=1e-4, atol=1e-5)
    for (yw, gw), (yg, gg) in zip(_train(want_m), _train(got_m)):
        torch.testing.assert_close(yg, yw, rtol=1e-4, atol=1e-5)
        for a, b in zip(gg, gw):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for k, v in _buffers(want_m).items():
        torch.testing.assert_close(_buffers(got_m)[k], v, rtol=1e-4, atol=1e-5)
    _assert_eval_matches(got_m, want_m, torch.randn(2, 3, 8, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("backend,strategy", [("triton", "auto"), ("triton", "scaled_outputs"),
                                              ("cuda", "auto"), ("torch", "auto")])
def test_matches_torch_per_layer_spectral_norm_on_gpu(backend, strategy):
    """The same comparison on CUDA tensors (torch's per-layer spectral_norm draws its vectors
    from the CUDA generator; ours draws the same ones): 3 training steps, every gradient and
    vector, then eval. Same tolerances as the CPU test."""
    why = lipkern.backends._why_not(backend, torch.device("cuda"), torch.float32)
    if why:
        pytest.skip(why)
    types = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)
    want_m = _per_layer_torch(_net(transposed=True).cuda(), types)
    got_m = _ours(_net(transposed=True).cuda(), types=types, backend=backend,
                  strategy=strategy)
    for k, v in _buffers(want_m).items():
        torch.testing.assert_close(_buffers(got_m)[k], v, rtol=1e-4, atol=1e-5)
    for (yw, gw), (yg, gg) in zip(_train(want_m, device="cuda"), _train(got_m, device="cuda")):
        torch.testing.assert_close(yg, yw, rtol=1e-4, atol=1e-5)
        for a, b in zip(gg, gw):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for k, v in _buffers(want_m).items():
        torch.testing.assert_close(_buffers(got_m)[k], v, rtol=1e-4, atol=1e-5)
    x = torch.randn(2, 3, 8, 8, device="cuda")
    want_m.eval()
    got_m.eval()
    torch.testing.assert_close(got_m(x), want_m(x), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_one_fused_kernel_per_forward_on_gpu(backend):
    """One lipkern:: op per training forward on CUDA, and in it one fused kernel; with Triton
    ("auto" = fused weights) the whole backward of the normalization is one more kernel."""
    why = lipkern.backends._why_not(backend, torch.device("cuda"), torch.float32)
    if why:
        pytest.skip(why)
    model = _ours(_net().cuda(), backend=backend)
    x = torch.randn(2, 3, 8, 8, device="cuda")
    model(x).sum().backward()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(x).sum().backward()
        torch.cuda.synchronize()
    ops = [e.name for e in prof.events() if e.name.startswith("lipkern::")]
    assert len([n for n in ops if "backward" not in n]) == 1, ops
    kernels = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert len([k for k in kernels if "power_iter" in k]) == 1, kernels
    assert len([k for k in kernels if "normalize_bwd" in k]) == (backend == "triton"), kernels


@pytest.mark.parametrize("backend,strategy", [("auto", "auto"), ("triton", "fused_weights")])
def test_two_forwards_before_one_backward_match_per_layer(backend, strategy):
    _backend_ok(backend if backend != "auto" else "torch")
    types = (nn.Linear, nn.Conv2d)
    want = _train(_per_layer_torch(_net(), types), two_forwards=True)
    got = _train(_ours(_net(), types=types, backend=backend, strategy=strategy),
                 two_forwards=True)
    for (yw, gw), (yg, gg) in zip(want, got):
        torch.testing.assert_close(yg, yw, rtol=1e-4, atol=1e-5)
        for a, b in zip(gg, gw):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_one_lipkern_op_per_forward(backend):
    _backend_ok(backend)
    model = _ours(_net(), backend=backend)
    group = model._lipkern_spectral_norm
    x = torch.randn(2, 3, 8, 8)
    model(x).sum().backward()
    from torch.profiler import profile
    with profile() as prof:
        model(x).sum().backward()
    names = [e.name for e in prof.events() if e.name.startswith("lipkern::")]
    fwd = [n for n in names if "backward" not in n]
    assert len(fwd) == 1, names
    # the sigma gradients travel inside the layers (ScaledLayer; the divided layers'
    # lipkern::divided_backward): no backward of the fused op
    assert not [n for n in names if n.startswith("lipkern::power_iter") and "backward" in n], \
        names
    calls = group.calls
    model.eval()
    with torch.no_grad():
        model(x)
    assert group.calls == calls + 1


@pytest.mark.parametrize("device,strategy,compiler", [
    ("cpu", "auto", "aot_eager"),
    # the Triton op inside an inductor graph (fake tensors of a Triton op need a GPU)
    pytest.param("cuda", "fused_weights", "inductor", marks=pytest.mark.gpu)])
def test_torch_compile_fullgraph_matches_eager(device, strategy, compiler):
    _assert_compiled_matches_eager(_ours(_net().to(device), strategy=strategy),
                                   torch.randn(2, 3, 8, 8, device=device), compiler)


def _assert_compiled_matches_eager(eager, x, compiler):
    """torch.compile(fullgraph=True) of a deep copy against the eager model: outputs over two
    training forwards, then every gradient and vector."""
    comp_m = copy.deepcopy(eager)
    compiled = torch.compile(comp_m, fullgraph=True, backend=compiler)
    for _ in range(2):
        ye, yc = eager(x), compiled(x)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-6)
        ye.square().sum().backward()
        yc.square().sum().backward()
    for a, b in zip(comp_m.parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    for k, v in _buffers(eager).items():
        torch.testing.assert_close(_buffers(comp_m)[k], v, rtol=1e-6, atol=1e-7)


def test_cached_eval_makes_no_call_until_something_changes():
    model = _ours(_net(), cache_eval=True)
    ref = _ours(_net())
    group = model._lipkern_spectral_norm
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    ref.eval()
    y0 = model(x)
    calls = group.calls
    for _ in range(3):
        torch.testing.assert_close(model(x), ref(x), rtol=1e-6, atol=1e-7)
    assert group.calls == calls  # zero power iterations per eval forward
    # gradients still reach the weights and the inputs
    xi = x.clone().requires_grad_()
    model(xi).sum().backward()
    assert xi.grad is not None and model[0].parametrizations.weight.original.grad is not None
    with torch.no_grad():  # a weight changes: recomputed
        model[0].parametrizations.weight.original.mul_(2)
        ref[0].parametrizations.weight.original.mul_(2)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-6, atol=1e-7)
    assert group.calls == calls + 1
    model.train()
    model(x)
    assert group.calls == calls + 2
    assert y0.shape == (2, 3)


def test_state_dict_interop_both_ways():
    types = (nn.Linear, nn.Conv2d)
    theirs = _per_layer_torch(_net(), types)
    _train(theirs, steps=2)
    ours = _ours(_net(seed=3), types=types)
    ours.load_state_dict(theirs.state_dict())
    theirs.eval()
    ours.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    ours.train()
    _train(ours, steps=1)
    back = _per_layer_torch(_net(seed=4), types)
    back.load_state_dict(ours.state_dict())
    back.eval()
    ours.eval()
    torch.testing.assert_close(back(x), ours(x), rtol=1e-5, atol=1e-6)


def test_save_load_deepcopy_and_dtype_moves():
    model = _ours(_net())
    _train(model, steps=1)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    want = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x), want)
    copied = copy.deepcopy(model)
    torch.testing.assert_close(copied(x), want)
    # the copy owns its vectors: training it leaves the original alone
    copied.train()
    _train(copied, steps=1)
    torch.testing.assert_close(model(x), want)
    # .double() replaces the buffers: the group re-packs them
    d = copy.deepcopy(model).double()
    torch.testing.assert_close(d(x.double()).float(), want, rtol=1e-5, atol=1e-6)
    d.train()
    d(x.double())
    assert d._lipkern_spectral_norm.u.dtype == torch.float64


def test_operator_mode_matches_per_layer_operator_mode_and_is_1_lipschitz():
    types = (nn.Linear, nn.Conv2d)
    x = torch.randn(1, 3, 8, 8)
    ours = _ours(_net(), types=types, mode="operator", example_input=x, n_power_iterations=30)
    per = _net()
    torch.manual_seed(1)
    sizes = {0: (8, 8), 2: (8, 8)}
    for i, m in enumerate(per):
        if isinstance(m, nn.Conv2d):
            lipkern.nn.spectral_norm(m, mode="operator", input_size=sizes[i],
                                     n_power_iterations=30)
        elif isinstance(m, nn.Linear):
            lipkern.nn.spectral_norm(m, n_power_iterations=30)
    torch.testing.assert_close(ours(x), per(x), rtol=1e-4, atol=1e-5)
    # the operator (not the reshaped kernel) now has norm 1: power iteration approaches the
    # top singular value from below, so the true value sits slightly above 1 (105 iterations
    # on a circular conv with close top singular values: measured 1.004)
    ours.eval()
    for i in (0, 2):
        w = ours[i].weight.detach()
        spec = lipkern.ConvSpec((8, 8), stride=ours[i].stride, padding=ours[i].padding,
                                padding_mode=ours[i].padding_mode)
        assert 1 - 1e-5 < float(lipkern.reference.exact_sigma(w, spec)) < 1.01
        assert float(lipkern.reference.exact_sigma(w)) < 0.999  # the reshaped one is below


def test_selection_by_names_and_types_and_remove():
    model = _ours(_net(), names=["0", "7"])
    group = model._lipkern_spectral_norm
    assert group.names == ["0", "7"] and isinstance(model[7], nn.Linear)
    assert not hasattr(model[2], "parametrizations")
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    want = model(x)
    remove_spectral_norm_model(model)
    assert type(model[0]) is nn.Conv2d and not hasattr(model, "_lipkern_spectral_norm")
    torch.testing.assert_close(model(x), want)  # the normalized weights were kept
    only_linear = _ours(_net(), types=nn.Linear, names=lambda name, m: m.bias is not None)
    assert only_linear._lipkern_spectral_norm.names == ["5"]


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(types=nn.ReLU), TypeError, "types:"),
    (dict(names=["nope"]), ValueError, "names:"),
    (dict(names=lambda n, m: False), ValueError, "no layer to normalize"),
    (dict(mode="operator"), ValueError, "needs example_input"),
    (dict(mode="exact"), ValueError, "mode must be"),
    (dict(n_power_iterations=0), ValueError, "n_power_iterations"),
    (dict(strategy="fast"), ValueError, "strategy must be"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        spectral_norm_model(_net(), **kwargs)


def test_refuses_what_it_cannot_fuse():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        spectral_norm_model([nn.Linear(2, 2)])
    m = _net()
    m[7].double()
    with pytest.raises(ValueError, match="one fused call needs one dtype"):
        spectral_norm_model(m)
    m = _net()
    torch_sn(m[0])
    with pytest.raises(ValueError, match="already parametrized"):
        spectral_norm_model(m)
    m = _ours(_net())
    with pytest.raises(ValueError, match="already has spectral_norm_model"):
        spectral_norm_model(m)
    m = _net()
    with torch.no_grad():
        m[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"0\.weight contains NaN"):
        spectral_norm_model(m)


# ---------------------------------------------------------------- strategy "inline" (CPU)
def _mlp(seed=0, width=10):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, width), nn.ReLU(), nn.Linear(width, width, bias=False),
                         nn.Tanh(), nn.Linear(width, 3))


def _train_mlp(model, steps=3, seed=5, two_forwards=False):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed)
    outs = []
    for _ in range(steps):
        x = torch.randn(4, 12, generator=g)
        opt.zero_grad()
        y = model(x)
        loss = y.square().mean() + (model(-x).sum() if two_forwards else 0)
        loss.backward()
        outs.append((y.detach().clone(), [p.grad.clone() for p in model.parameters()],
                     {k: v.clone() for k, v in _buffers(model).items()}))
        opt.step()
    return outs


def _lipkern_ops(model, x):
    from torch.profiler import profile
    with profile() as prof:
        model(x).sum().backward()
    return [e.name for e in prof.events() if e.name.startswith("lipkern::")]


inline_only = pytest.mark.skipif(not lipkern.ops.sn_linear.available(),
                                 reason="lipkern._C is not built")


@inline_only
@pytest.mark.parametrize("n_power_iterations", [1, 3])
@pytest.mark.parametrize("strategy", ["auto", "inline"])
@pytest.mark.parametrize("two_forwards", [False, True])
def test_inline_matches_torch_per_layer_spectral_norm(strategy, n_power_iterations,
                                                      two_forwards):
    """A Linear-only model on the CPU: "auto" picks "inline" (each layer one lipkern::sn_linear,
    no separate power-iteration call). Outputs, every gradient and every vector over 3 training
    steps (also with two forwards before one backward) and an eval forward match torch's
    per-layer spectral_norm; same tolerances as above."""
    want_m = _per_layer_torch(_mlp(), nn.Linear, n_power_iterations=n_power_iterations)
    got_m = _ours(_mlp(), n_power_iterations=n_power_iterations, strategy=strategy)
    for (yw, gw, bw), (yg, gg, bg) in zip(_train_mlp(want_m, two_forwards=two_forwards),
                                          _train_mlp(got_m, two_forwards=two_forwards)):
        torch.testing.assert_close(yg, yw, rtol=1e-4, atol=1e-5)
        for a, b in zip(gg, gw):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        for k, v in bw.items():
            torch.testing.assert_close(bg[k], v, rtol=1e-4, atol=1e-5)
    group = got_m._lipkern_spectral_norm
    assert group.calls == 0  # no fused call per forward (registration is not counted)
    _assert_eval_matches(got_m, want_m, torch.randn(2, 12))


@inline_only
def test_inline_runs_one_layer_op_per_layer_and_nothing_else():
    model = _ours(_mlp())
    x = torch.randn(3, 12)
    model(x).sum().backward()
    names = _lipkern_ops(model, x)
    assert names.count("lipkern::sn_linear") == 3, names
    assert not [n for n in names if "power_iter" in n or "normalize" in n], names
    # the one-launch strategies stay one op per forward on the same model
    one = _ours(_mlp(), strategy="scaled_outputs", backend="cpp")
    one(x).sum().backward()
    fwd = [n for n in _lipkern_ops(one, x) if "backward" not in n]
    assert fwd == ["lipkern::power_iter_ext"], fwd


@inline_only
def test_inline_layer_called_twice_is_normalized_once():
    """A layer used twice in one forward: one update of its vectors, both calls with the
    same normalized weight -- torch's per-layer spectral_norm inside parametrize.cached()."""
    from torch.nn.utils import parametrize

    def shared(seed):
        torch.manual_seed(seed)
        lin = nn.Linear(8, 8)
        return nn.Sequential(lin, nn.ReLU(), lin, nn.Linear(8, 2))

    want_m = _per_layer_torch(shared(0), nn.Linear)
    got_m = _ours(shared(0))
    x = torch.randn(5, 8)
    for _ in range(2):
        with parametrize.cached():
            yw = want_m(x)
        yg = got_m(x)
        torch.testing.assert_close(yg, yw, rtol=1e-4, atol=1e-5)
        yw.square().sum().backward()
        yg.square().sum().backward()
        for a, b in zip(got_m.parameters(), want_m.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
        for k, v in _buffers(want_m).items():
            torch.testing.assert_close(_buffers(got_m)[k], v, rtol=1e-4, atol=1e-5)


@inline_only
def test_inline_falls_back_where_it_does_not_apply():
    """bfloat16 weights and autocast take the one-call scaled path (same model object);
    explicit strategy="inline" on a model with convs is refused."""
    model = _ours(_mlp()).to(torch.bfloat16)
    want = _per_layer_torch(_mlp(), nn.Linear).to(torch.bfloat16)
    group = model._lipkern_spectral_norm
    x = torch.randn(4, 12, dtype=torch.bfloat16)
    calls = group.calls
    torch.testing.assert_close(model(x).float(), want(x).float(), rtol=3e-2, atol=3e-2)
    assert group.calls == calls + 1
    with pytest.raises(ValueError, match="strategy='inline'.*nn.Linear"):
        _ours(_net(), strategy="inline")


@inline_only
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_inline_under_torch_compile_fullgraph(compiler):
    _assert_compiled_matches_eager(_ours(_mlp()), torch.randn(4, 12), compiler)
