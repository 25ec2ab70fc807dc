"""forward_over_reverse_hvp says nothing of torch's internals (issue 21, "Noise").

torch 2.14's first ``torch.func.jvp`` imports ``torch._decomp.decompositions_for_jvp``, which calls
``torch.jit.script`` on 9 functions: 18 ``FutureWarning: `torch.jit.script` is deprecated`` lines
(measured) in the user's output, about torch's own code. Exactly that warning is silenced around the
call; every other warning, the caller's loss function's among them, still shows.

A fresh interpreter: the warnings come once per process, at that import, which an earlier test may
already have done.
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import warnings
import torch
from hessianflow.curvature.hvp import forward_over_reverse_hvp

warnings.simplefilter("always")

def loss(ps):
    warnings.warn("the loss function's own FutureWarning", FutureWarning)
    return (ps[0] ** 3).sum()

for _ in range(2):
    hv = forward_over_reverse_hvp(loss, [torch.tensor([1.0, 2.0], dtype=torch.float64)],
                                  [torch.tensor([1.0, -1.0], dtype=torch.float64)])
    print("HV", hv[0].tolist())
warnings.warn("after the products", FutureWarning)
"""


def test_the_first_forward_over_reverse_product_prints_no_torch_jit_warning():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # H = diag(6 w) at w = (1, 2): Hv = (6, -12), exactly, both times
    assert proc.stdout.split("\n")[:2] == ["HV [6.0, -12.0]", "HV [6.0, -12.0]"], proc.stdout
    assert "torch.jit.script" not in proc.stderr, proc.stderr
    # exactly that warning: the caller's own FutureWarnings inside and after the call still show
    assert proc.stderr.count("the loss function's own FutureWarning") == 2, proc.stderr
    assert proc.stderr.count("after the products") == 1, proc.stderr
