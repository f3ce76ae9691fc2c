import os
import random

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
if not torch.cuda.is_available():  # Triton kernels (if Triton is installed) run in its CPU interpreter; it
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is first imported
torch.set_num_threads(1)  # tests use tiny tensors: one thread avoids oversubscription on shared cores


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state."""
    random.seed(0)
    torch.manual_seed(0)
    yield
