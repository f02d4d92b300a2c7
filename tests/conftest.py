"""Shared test fixtures: fresh random seeds per test (printed on failure) and error measures."""
from __future__ import annotations

import os
import random

import pytest
import torch

import fusednn  # noqa: F401  (turns Triton's interpreter on before any kernel module is imported)


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Seed torch with a fresh random seed each run; the seed is shown when a test fails."""
    seed = int(os.environ.get("FUSEDNN_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(seed)
    random.seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            rep.sections.append(("seed", f"reproduce with FUSEDNN_TEST_SEED={seeds[0]}"))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (0 when both are zero)."""
    out, ref = out.detach().double(), ref.detach().double()
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
