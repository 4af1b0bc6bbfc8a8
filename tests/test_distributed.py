"""pyoptim under torch.distributed: FSDP2 (DTensor params), DDP, ZeroRedundancyOptimizer and SyncBatchNorm, two
gloo ranks on CPU (tests/_distributed.py holds the cases and their oracles).

Every selected case runs in one spawn of the two ranks (starting them is most of the cost); each test reports
its own case.
"""

from __future__ import annotations

import pytest
import torch

from tests import _distributed

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

_NAMES = list(_distributed.CASES)


@pytest.fixture(scope="module")
def results(request) -> dict:
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")]
    return _distributed.run_cases([n for n in _NAMES if n in selected])


@pytest.mark.parametrize("case", _NAMES)
def test_case(results, case):
    """One multi-process case (its docstring in tests/_distributed.py) passed on every rank."""
    error = results[case]
    if error is not None:
        pytest.fail(error, pytrace=False)
