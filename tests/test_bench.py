"""The benchmark runs and writes its table (a smoke test: no speed is asserted here)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import bench_power_iter  # noqa: E402


def test_bench_quick_writes_rows(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    rows = bench_power_iter.main(["--quick", "--workload", "toy", "--scale", "cpu",
                                  "--out", str(out)])
    names = [r["provider"] for r in rows]
    assert names[:2] == ["naive", "grouped"] and "lipkern" in names
    text = capsys.readouterr().out
    assert "| provider | median ms |" in text and "Lipschitz upper bound" in text
    saved = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(saved) == len(rows) and all("device" in r and "torch" in r for r in saved)
    # every provider computes the same operator sigmas as the naive loop (torch_sn excepted:
    # it reports the reshaped kernel's)
    naive = rows[0]["sigmas"]
    for r in rows:
        if r["sigmas"] is not None:
            assert max(abs(a - b) / b for a, b in zip(r["sigmas"], naive)) < 1e-4, r["provider"]


def test_sweep_and_accuracy_quick(tmp_path, capsys):
    rows = bench_power_iter.main(["--quick", "--workload", "sweep", "--out",
                                  str(tmp_path / "s.jsonl"), "--providers",
                                  "naive,grouped,lipkern"])
    assert {r["n_layers"] for r in rows} == {1, 4}
    out = capsys.readouterr().out
    assert "| layers | width | naive ms |" in out
    import bench_accuracy
    acc = bench_accuracy.main(["--quick", "--no-save"])
    by = {r["provider"]: r for r in acc}
    # the reshaped kernel underestimates the conv operator norm; 20 iterations beat 1
    assert by["torch spectral_norm (reshaped kernel)"]["mean_signed_rel"] < -0.1
    assert by["lipkern operator, 20 it"]["max_abs_rel"] < by["lipkern operator, 1 it"]["max_abs_rel"]


def test_entry_point_lists_scripts(capsys):
    import run
    assert run.main([]) == 2 and "power_iter" in capsys.readouterr().out


def test_spectral_norm_bench_runs(tmp_path, capsys):
    import bench_spectral_norm
    out = tmp_path / "sn.jsonl"
    bench_spectral_norm.main(["--workload", "mlp", "--batch", "2", "--reps", "1",
                              "--warmup", "1", "--no-deel", "--out", str(out)])
    text = capsys.readouterr().out
    assert "torch_sn" in text and "lipkern" in text and "overhead ms" in text
    row = json.loads(out.read_text().splitlines()[0])
    import lipkern
    inline = lipkern.ops.sn_linear.available()
    # plain_lk (the unnormalized model on lipkern's matmul) runs where lipkern runs inline
    assert set(row["median_ms"]) == {"plain", "torch_sn", "lipkern", "lipkern_scaled",
                                     "lipkern_grouped"} | \
        ({"plain_lk"} if inline else set())
    assert row["layers"] == 100
    assert row["lipkern_strategy"] == ("inline" if inline else "scaled_outputs")
    if inline:
        assert row["overhead_equal_matmul_ms"] == pytest.approx(
            row["median_ms"]["lipkern"] - row["median_ms"]["plain_lk"])
        assert "at equal matmuls" in text
    else:
        assert row["overhead_equal_matmul_ms"] is None
    # work per step is counted for every provider (aten ops on the CPU, kernels on a GPU)
    assert set(row["launches_per_step"]) == set(row["median_ms"])
    assert row["launches_per_step"]["torch_sn"] > row["launches_per_step"]["plain"] > 0


def test_graph_mode_needs_a_gpu(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: --graph runs (bench/gpu_session.sh times it)")
    assert bench_power_iter.main(["--graph", "--quick", "--no-save"]) is None
    assert "needs a CUDA device" in capsys.readouterr().err


def test_host_time_bench_runs(capsys):
    import bench_host_time
    assert bench_host_time.main(["--layers", "3", "--width", "4", "--reps", "2", "--only",
                                 "call_grouped_fb,normalize_grouped_fb,model_plain_step"]) == 0
    out = capsys.readouterr().out
    assert "| call_grouped_fb |" in out and "| model_plain_step |" in out


def test_spectral_norm_convnets_bench_runs(tmp_path, capsys):
    """Issue 16's conv-net run (one model, batch 1, one rep): a table, a verdict, a JSON row."""
    import bench_spectral_norm
    out = tmp_path / "sn_conv.jsonl"
    bench_spectral_norm.main(["--workload", "wrn10_2", "--batch", "1", "--reps", "1",
                              "--warmup", "0", "--out", str(out)])
    text = capsys.readouterr().out
    assert "verdict: matrix" in text and "lk_op" in text and "cannot run" not in text
    row = json.loads(out.read_text().splitlines()[0])
    assert row["lipkern_strategy"] == "mixed" and "torch_sn" in row["overhead_ms"]
    assert row["device"] and row["versions"] and row["date"]
