"""Layer sets used across tests: every kind, odd shapes (1, primes, > one block)."""
import torch

from lipkern import ConvSpec

# (weight shape, spec): one entry per kind/setting; sizes kept small for the interpreter
MIXED = [
    ((7, 5), None),                                             # dense
    ((1, 13), None),                                            # dense, one row
    ((70, 33), None),                                           # dense, > one block each way
    ((5, 3, 3, 3), None),                                       # reshaped kernel
    ((6, 3, 3, 3), ConvSpec((7, 5), padding=1)),                # conv, rectangular input
    ((4, 2, 3, 2), ConvSpec((9, 7), stride=(2, 1), dilation=(1, 2), padding=(1, 0))),
    ((6, 1, 3, 3), ConvSpec(5, padding=1, groups=3)),           # grouped (cin 3, cout 6)
    ((5, 4, 3, 3), ConvSpec((6, 5), stride=2, padding=1, padding_mode="circular")),
    ((3, 4, 3, 3), ConvSpec(4, stride=2, padding=1, transposed=True, output_padding=1)),
    ((4, 3, 2, 2), ConvSpec((3, 5), stride=2, groups=2, transposed=True)),
    ((4, 3, 5), ConvSpec(11, padding=2)),                       # conv1d
    ((35, 34, 1, 1), ConvSpec(2)),                              # channels > one block
]


def make_weights(entries, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
          for shape, _ in entries]
    return ws, [spec for _, spec in entries]


def leaf(ws):
    return [w.detach().clone().requires_grad_() for w in ws]


FLOOR = 1e-5  # measured: fp32 kernels sit within 3e-6 relative of the fp64 reference here


def assert_close_rule(name, got, want64, ref32):
    """flash-attention's rule: a backend's error against the float64 reference is at most 2x
    the error of the reference itself run in the op's precision, plus a floor of FLOOR x the
    result's scale for outputs the lower-precision reference happens to hit exactly."""
    # an output stored in bf16/fp16 may round one ulp away from where the reference's value
    # rounded (measured: 0.056 on a bf16 gradient of scale 11.5, one ulp is 0.0625)
    floor = max(FLOOR, torch.finfo(got.dtype).eps)
    got, want64, ref32 = (t.detach().double().cpu() for t in (got, want64, ref32))
    scale = float(want64.abs().max())
    err = float((got - want64).abs().max())
    base = float((ref32 - want64).abs().max())
    assert err <= 2 * base + floor * scale, f"{name}: err {err:.3g} > 2 x {base:.3g} + floor"
