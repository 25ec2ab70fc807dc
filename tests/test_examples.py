"""The examples run as scripts (so they cannot rot) and what they print is right."""

import os
import re
import subprocess
import sys

import pytest
from dense_reference import check_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_runs_and_its_numbers_are_right(tmp_path):
    pytest.importorskip("matplotlib")
    out_dir = tmp_path / "figs"
    # one thread: the products are tiny, and on a loaded machine OpenMP threads only contend
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "quickstart.py"), str(out_dir)],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout

    # Lanczos against the dense Hessian (float64): the script says how close, and it is close
    top = [float(v) for v in re.search(r"top-3 eigenvalues \(lanczos, \d+ products\): (.+)", text).group(1).split(",")]
    assert len(top) == 3 and top[0] >= top[1] >= top[2] > 0
    assert "converged: True" in text
    err = float(re.search(r"max \|lanczos - eigvalsh\| = (\S+);", text).group(1))
    assert err < 1e-10 * top[0]  # what tol=1e-10 promises each eigenvalue

    # the trace estimate is within 4 standard errors of the exact trace, and the per-layer traces
    # (exact diagonal blocks) add up to the exact trace
    m = re.search(r"trace: (\S+) ± (\S+) \(.*\); exact (\S+)", text)
    est, se, exact = (float(g) for g in m.groups())
    assert se > 0 and abs(est - exact) <= 4 * se
    layers = re.findall(r"^(fc\d)\s+(\d+)\s+(\S+)\s+(\S+)$", text, flags=re.M)
    assert [(name, int(size)) for name, size, _, _ in layers] == [("fc1", 64 * 16 + 16), ("fc2", 16 * 4 + 4)]
    total = float(re.search(r"sum of the layer traces: (\S+)", text).group(1))
    assert total == pytest.approx(exact, rel=1e-8)
    assert total == pytest.approx(sum(float(t) for *_, t in layers), rel=1e-6)
    # Cauchy interlacing: no diagonal block's top eigenvalue exceeds the whole Hessian's
    assert max(float(e) for _, _, e, _ in layers) <= top[0] * (1 + 1e-8)

    figures = re.findall(r"^figure: (.+)$", text, flags=re.M)
    assert [os.path.basename(f) for f in figures] == ["density.png", "per_layer.png", "landscape.png"]
    for f in figures:
        assert os.path.dirname(f) == str(out_dir)
        check_png(f)
