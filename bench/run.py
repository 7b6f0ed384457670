"""One entry point for every benchmark:

    python bench/run.py power_iter [--workload toy|resnet18|mlp|sweep ...]
    python bench/run.py accuracy   [--workload toy|resnet18 ...]
    python bench/run.py bound      [--n-iters 5 ...]
    python bench/run.py cpu_targets
    python bench/run.py spectral_norm [--workload mlp|critic ...]

Each script also runs on its own (python bench/bench_<name>.py --help).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SCRIPTS = {"power_iter": "bench_power_iter", "accuracy": "bench_accuracy",
           "spectral_norm": "bench_spectral_norm",
           "bound": "bench_bound", "cpu_targets": "bench_cpu_targets"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SCRIPTS:
        print(__doc__)
        return 2
    module = __import__(SCRIPTS[argv[0]])
    module.main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
