"""`single_thread`: a module-scoped fixture running a test module on one torch thread.

Tiny models run faster on one thread, and do not stall when the shared CPU is busy. Import it into a test
module and request it for every test there:

    from tests.threads import single_thread  # noqa: F401  (fixture)

    pytestmark = pytest.mark.usefixtures("single_thread")
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
