"""Suite-wide settings.

One intra-op thread: the models here are tiny, and on a two-core machine shared with other processes
(CI, subprocess workers of the distributed and kill tests) torch's default of one thread per core was
measured 16-30x slower per Hessian-vector product than a single thread.
"""

import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
