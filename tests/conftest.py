"""Test-wide setup. Without a GPU, Triton kernels run in its interpreter on CPU tensors; that mode
must be chosen before any kernel is defined, hence here, before the package is imported."""
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def one_thread():
    """Tiny models: extra threads only wait on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def seeded_global_rng(request):
    """Every test starts from a seed of its own id, so what it draws from the global generator does not depend on
    which tests ran before it, and a failure reproduces when the test runs alone (crc32: stable across processes)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
