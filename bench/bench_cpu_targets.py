"""The CPU targets of the compiled kernels, measured side by side in one run.

    python bench/bench_cpu_targets.py [--reps 15]

Runs bench_power_iter.py (round-robin timing) on the two CPU workloads -- the toy network
shrunk to CPU size (20 conv 3x3 32->32 at 16x16, 5 iterations) and 64 dense 256x256 layers
with 1 warm-started iteration -- for the naive loop, the grouped version and lipkern (auto),
forward + backward, then prints each ratio beside its target. Rows go to
bench/results/power_iter.jsonl like every bench run.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_power_iter  # noqa: E402

TARGETS = {"toy": {"naive": 8.0, "grouped": 3.0}, "mlp": {"naive": 40.0, "grouped": 8.0}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-save", action="store_true")
    a = p.parse_args(argv)
    lines = []
    for wl in ("toy", "mlp"):
        args = ["--workload", wl, "--scale", "cpu", "--device", "cpu", "--reps", str(a.reps),
                "--warmup", str(a.warmup), "--providers", "naive,grouped,lipkern"]
        rows = {r["provider"]: r["median_ms"] for r in
                bench_power_iter.main(args + (["--no-save"] if a.no_save else []))}
        for base, target in TARGETS[wl].items():
            ratio = rows[base] / rows["lipkern"]
            lines.append(f"| {wl} | lipkern vs {base} | {ratio:.1f}x | >= {target:.0f}x | "
                         f"{'met' if ratio >= target else 'NOT met'} |")
        print()
    print("| workload | comparison | measured | target | |\n|---|---|---:|---:|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
