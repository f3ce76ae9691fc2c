import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny graphs: one intra-op thread is fastest and behaves on a shared, loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
