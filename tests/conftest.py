import os

import pytest
import torch

# Two xdist workers on two cores: one thread each avoids oversubscription.
torch.set_num_threads(1)
os.environ.setdefault("REPARAM_TEST", "1")


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)
