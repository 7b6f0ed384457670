"""backend="auto" by evidence (lipkern.evidence) and lipkern.explain."""
import pytest
import torch

import lipkern
from lipkern import ConvSpec, evidence
from lipkern.backends import choose_backend
from lipkern.layout import layout_for

from layers import MIXED, leaf, make_weights

HAS_EXT = lipkern.backends.load_ext() is not None
CONVS = [((8, 8, 3, 3), ConvSpec(8, padding=1))] * 3 + [((10, 8), None)]
DENSE = [((16, 16), None)] * 3 + [((5, 3, 3, 3), None)]


def _geoms(entries):
    ws, specs = make_weights(entries)
    return layout_for(tuple(tuple(w.shape) for w in ws), tuple(specs)).geoms


def test_table_rows_are_measured_and_fastest_first():
    for (fam, cls, op), rows in evidence.TABLE.items():
        assert cls in ("dense", "conv") and op in ("power_iter", "normalize")
        assert rows and all(r.backend in lipkern.validate.BACKENDS and r.ms > 0 and r.source
                            for r in rows)
        assert [r.ms for r in rows] == sorted(r.ms for r in rows), (fam, cls, op)


def test_shape_class():
    assert evidence.shape_class(_geoms(DENSE)) == "dense"
    assert evidence.shape_class(_geoms(CONVS)) == "conv"
    assert evidence.shape_class(_geoms(MIXED)) == "conv"


@pytest.mark.parametrize("op", ["power_iter", "normalize"])
@pytest.mark.parametrize("entries", [CONVS, DENSE], ids=["conv", "dense"])
def test_auto_on_cpu_stays_on_the_compiled_kernel(entries, op):
    """The CPU measurements (grouped 2.6-7x slower than cpp) keep cpp the CPU choice."""
    got = evidence.choose(_geoms(entries), torch.device("cpu"), torch.float32, op)
    assert got.backend == ("cpp" if HAS_EXT else "grouped"), got


def _as_gpu(monkeypatch, family, missing=()):
    """Pretend to be a CUDA device of this family on which every backend but ``missing``
    runs (the choice only reads the family and _why_not)."""
    monkeypatch.setattr(evidence, "device_family", lambda device: family)
    monkeypatch.setattr(lipkern.backends, "_why_not",
                        lambda b, d, t: f"{b} missing" if b in missing else None)


def test_auto_on_hopper_follows_the_measurements(monkeypatch):
    _as_gpu(monkeypatch, "sm90")
    dev = torch.device("cpu")
    conv = evidence.choose(_geoms(CONVS), dev, torch.float32)
    assert conv.backend == "grouped" and "7 ms" in conv.reason and "H100" in conv.reason
    dense = evidence.choose(_geoms(DENSE), dev, torch.float32)
    assert dense.backend == "cuda" and dense.measured.ms == 3.7
    assert evidence.choose(_geoms(DENSE), dev, torch.float32, "normalize").backend == "triton"
    _as_gpu(monkeypatch, "sm90", missing=("cuda",))
    dense = evidence.choose(_geoms(DENSE), dev, torch.float32)
    assert dense.backend == "triton" and "cuda missing" in dense.reason


def test_auto_elsewhere_is_grouped_until_measured(monkeypatch):
    _as_gpu(monkeypatch, "sm80")
    for entries in (CONVS, DENSE):
        got = evidence.choose(_geoms(entries), torch.device("cpu"), torch.float32)
        assert got.backend == "grouped" and got.measured is None
        assert "no kernel measured faster" in got.reason


def test_auto_call_runs_the_chosen_backend():
    ws, specs = make_weights(CONVS, seed=2)
    lay = layout_for(tuple(tuple(w.shape) for w in ws), tuple(specs))
    chosen = choose_backend("auto", lay, torch.device("cpu"), torch.float32)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = lipkern.fused_power_iter(ws, specs, generator=gen())
    b = lipkern.fused_power_iter(ws, specs, generator=gen(), backend=chosen)
    assert torch.equal(a.sigmas, b.sigmas)


def test_explain_names_backend_path_and_reason():
    ws, specs = make_weights(CONVS, seed=3)
    e = lipkern.explain(ws, specs, backend="grouped")
    assert e.backend == "grouped" and e.reason == "explicit backend='grouped'"
    assert [r.kind for r in e.layers] == ["conv"] * 3 + ["dense"]
    assert "groups=3" in e.layers[0].path and "bucket 0 of 3" in e.layers[2].path
    assert "torch.bmm" in e.layers[3].path
    auto = lipkern.explain(ws, specs)
    assert auto.reason.startswith("auto: ") and auto.shape_class == "conv"
    assert auto.device_family == "cpu"
    norm = lipkern.explain(ws, specs, backend="torch", op="normalize")
    assert "division" in norm.layers[0].path
    text = str(auto)
    assert "| 3 | (10, 8) | dense |" in text


def test_explain_validates_like_the_call():
    ws, specs = make_weights(CONVS, seed=4)
    with pytest.raises(ValueError, match="op must be"):
        lipkern.explain(ws, specs, op="bound")
    with pytest.raises(ValueError, match="specs has"):
        lipkern.explain(ws, specs[:2])
    with pytest.raises(ValueError, match="backend must be one of"):
        lipkern.explain(ws, specs, backend="cudnn")


def test_auto_under_torch_compile_fullgraph():
    """The memoized choice (a dict lookup by the layout's id) traces without a graph break."""
    ws, specs = make_weights(MIXED[:6], seed=5)
    state = lipkern.fused_power_iter(ws, specs, generator=torch.Generator().manual_seed(0)).state

    def step(ws):
        return lipkern.fused_power_iter(ws, specs, n_iters=1, state=state).sigmas

    torch._dynamo.reset()
    a, b = leaf(ws), leaf(ws)
    step(a).sum().backward()
    torch.compile(step, fullgraph=True, backend="aot_eager")(b).sum().backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)
