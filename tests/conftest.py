"""Suite-wide settings.

One intra-op thread: the models here are tiny, and on a two-core machine shared with other processes
(CI, subprocess workers of the distributed and kill tests) torch's default of one thread per core was
measured 16-30x slower per Hessian-vector product than a single thread.

The CPU only, also on a machine with a GPU: the tests compare the scripts (whose ``--device auto``
would pick CUDA) with CPU references bit for bit, and their subprocesses inherit the setting. The
CUDA paths are checked by ``benchmarks/gpu_check.py`` on a GPU machine (measured there: the suite
run as-is on an H200 failed 5 such comparisons, all device-related).
"""

import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA (it does so lazily)
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
