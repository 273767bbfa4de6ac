"""Fixtures more than one test file uses."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """The machine is shared: two spinning OpenMP threads slow a tiny model many-fold. A module opts in with
    pytestmark = pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
