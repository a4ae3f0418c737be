import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_and_seed():
    """Keep the shared 2-core machine usable and every test reproducible."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(previous)
