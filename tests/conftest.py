import os
import random

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(1)  # tests use tiny tensors: one thread avoids oversubscription on shared cores


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    random.seed(0)
    torch.manual_seed(0)
    yield
