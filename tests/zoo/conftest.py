import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Small batched ops run fastest on one thread when the 2 cores are shared (no OpenMP spin-waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
