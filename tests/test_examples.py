"""The README's examples run, and do what they say."""
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "examples"))

import regularize  # noqa: E402


def test_regularizer_example_shrinks_the_bound(capsys):
    history = regularize.main(["--steps", "12"])
    assert history[-1] < 0.8 * history[0], history
    assert "Lipschitz upper bound" in capsys.readouterr().out


def test_ddp_example_runs():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "ddp_regularize.py"),
                          "--world", "2"], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 9" in out.stdout


def test_readme_whole_model_example_runs(capsys):
    """The README's spectral_norm_model block, executed as written."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = text[text.index("## Spectral norm for a whole model"):]
    code = block[block.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    exec(compile(code, "README.md", "exec"), {})
    assert "torch.Size([2, 1])" in capsys.readouterr().out


def test_readme_gan_gradient_penalty_example_runs(capsys):
    """The README's conv-net block (WGAN-GP with spectral_norm_model), executed as written."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = text[text.index("### Conv nets: the default per layer"):]
    code = block[block.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("0 {'0': ") and "\n1 {" in out
