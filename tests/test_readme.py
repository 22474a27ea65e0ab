"""The README's Python examples run as written, in order, in one namespace, and say what the README says."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).parents[1] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    # The README claims log10 ||dL/dh_0|| of the gain-0.5 tanh RNN at T = 3000 is about -919: 2999 steps at the
    # mean-field rate (an independent closed form) below the last step's value.
    from rnnlab import theory

    log10_norms = np.asarray(namespace["log10_norms"])
    predicted = log10_norms[-1] + 2999 * theory.tanh_rate(0.5, input_variance=0.01)
    assert abs(log10_norms[0] - predicted) < 0.01 * abs(predicted) and abs(log10_norms[0] + 919) < 5
    assert namespace["ys"].shape == (50, 16, 16)
