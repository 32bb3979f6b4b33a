import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: tests often share a small machine; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
