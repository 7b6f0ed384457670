"""Checks of the v2 kernels that need no GPU: every CI specialization compiles for sm_90 and
sm_80 within a register budget and without spills, the PTX of the group barrier has its
release arrive and its acquire load, the grid sizing never exceeds the SM count of a device
description (fake ones down to a MIG slice and a single SM), the plan covers every conv of
the benchmark networks, and the strided adjoint's tap progressions match brute force.

Register budget: <= 255 (the hardware cap; the v2 forward runs ONE 4-warp CTA per SM by
design, so registers cost no occupancy below it) and 0 bytes of spill stores and loads
(ptxas -v): the forward is the hot kernel, a spill there is a round trip to L1/L2 in the
inner loop. (A noinline per-class step function compiled the 11-class ResNet-18 kernel
faster but spilled 84 bytes at the call in the ieee variant: everything is inlined.)
Measured here (Triton 3.9, 2026-12-02): toy class 128-151 registers on sm_90.
"""
import json
import os
import subprocess
import sys

import pytest

from lipkern import ConvSpec
from lipkern.spec import resolve_geometry
from lipkern.triton_kernels import v2_plan

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from gpu_v2_check import NETWORKS  # noqa: E402

REG_BUDGET = 255


def _geoms(entries):
    return [resolve_geometry(tuple(s), sp, f"w{i}") for i, (s, sp) in enumerate(entries)]


@pytest.fixture(scope="module", params=[90, 80], ids=["sm_90", "sm_80"])
def compiled(request):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-m", "lipkern.triton_kernels.v2_aot", "--cap",
                          str(request.param), "--set", "ci"], capture_output=True, text=True,
                         timeout=1200, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == (4 if request.param >= 90 else 3), out.stdout
    return rows


def test_every_specialization_compiles_within_the_register_budget(compiled):
    for r in compiled:
        assert r["reg"] <= REG_BUDGET, r
        assert r["spill_bytes"] == 0, f"spills: {r}"


def test_barrier_ptx_has_release_arrive_and_acquire_load(compiled):
    for r in compiled:
        with_barrier = r.get("barrier", True)
        assert r["release"] == with_barrier and r["acquire"] == with_barrier, r


def test_tiles_load_with_16_byte_copies(compiled):
    """The scratch offsets' multiple_of hints reach the loads (4-byte copies otherwise)."""
    for r in compiled:
        assert r["cp_async_16"] > 0, r


@pytest.mark.parametrize("sms", [1, 2, 7, 14, 16, 20, 21, 66, 114, 132])
@pytest.mark.parametrize("net", sorted(NETWORKS))
def test_grid_never_exceeds_the_sm_count(net, sms):
    """Persistent mode only when every program is co-resident (one CTA per SM); more layers
    than SMs (a MIG 1g slice has 14-16 SMs, 20 toy layers) go to the step mode."""
    plan = v2_plan.make_plan(_geoms(NETWORKS[net]()), v2_plan.DeviceDesc(sms))
    if plan.mode == "persistent":
        assert sum(plan.programs) <= sms
    else:
        assert len(plan.v2_layers) > sms
    assert min(plan.programs) >= 1 and max(plan.programs) <= v2_plan.MAX_PROGRAMS_PER_LAYER


def test_non_cooperative_device_uses_the_step_mode():
    plan = v2_plan.make_plan(_geoms(NETWORKS["toy"]()), v2_plan.DeviceDesc(132, cooperative=False))
    assert plan.mode == "step"
    with pytest.raises(ValueError, match="mode"):
        v2_plan.make_plan(_geoms(NETWORKS["toy"]()), v2_plan.DeviceDesc(132), mode="fast")


def test_size_groups_shortens_the_slowest_layer():
    G = v2_plan.size_groups([4, 1, 1], [100, 100, 100], 12)
    assert G == [8, 2, 2] and sum(G) == 12
    # layer 0 has 3 tiles: at 3 programs it cannot shrink, more programs elsewhere would idle
    assert v2_plan.size_groups([1, 1], [3, 100], 20) == [3, 4]
    assert v2_plan.size_groups([1] * 5, [9] * 5, 4) is None       # more layers than SMs
    assert v2_plan.size_groups([5], [1], 132) == [1]              # one tile: one program


def test_toy_on_an_h100_gets_six_programs_per_layer():
    plan = v2_plan.make_plan(_geoms(NETWORKS["toy"]()), v2_plan.DeviceDesc(132))
    assert plan.mode == "persistent" and set(plan.programs) == {6} and len(plan.classes) == 1


@pytest.mark.parametrize("net", sorted(NETWORKS))
def test_plan_covers_every_conv_of_the_benchmark_networks(net):
    geoms = _geoms(NETWORKS[net]())
    plan = v2_plan.make_plan(geoms, v2_plan.DeviceDesc(132))
    assert [geoms[i].kind for i in plan.v1_layers] == [0] * len(plan.v1_layers)  # dense only
    assert len(plan.classes) <= v2_plan.MAX_CLASSES


@pytest.mark.parametrize("k,s,p,d", [(k, s, p, d) for k in (1, 2, 3, 4, 5) for s in (1, 2)
                                     for p in (0, 1, 2) for d in (1, 2)])
def test_tap_progressions_are_the_brute_force_sets(k, s, p, d):
    for r in range(s):
        start, step, count = v2_plan.tap_progression(r, k, s, p, d)
        want = [kh for kh in range(k) if (r + p - kh * d) % s == 0]
        assert [start + step * a for a in range(count)] == want


def test_uncovered_layers_are_named_with_a_reason():
    geoms = _geoms([((4, 2, 3, 3), ConvSpec(6, padding=1, groups=2)),
                    ((4, 4, 3, 3), ConvSpec(9, stride=3)),
                    ((4, 4, 3, 3), ConvSpec(9, stride=2, padding=1, padding_mode="circular")),
                    ((4, 4, 9, 9), ConvSpec(12)),
                    ((5, 7), None)])
    plan = v2_plan.make_plan(geoms, v2_plan.DeviceDesc(132))
    assert plan.v2_layers == () and plan.v1_layers == (0, 1, 2, 3, 4)
    assert [r.split()[0] for r in plan.v1_reasons] == ["groups=2", "stride", "circular",
                                                       "kernel", "dense"]
    assert "v1: 0 (groups=2)" in v2_plan.describe(plan)
