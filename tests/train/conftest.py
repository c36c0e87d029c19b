import numba
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Training tests take tiny steps: on a shared machine torch's and numba's thread pools
    spin against each other and a step takes 30x longer than on one thread."""
    torch_threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    numba.set_num_threads(numba_threads)
