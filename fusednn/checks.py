"""torch's C++ checks that fusednn's steady states rely on, each with a probe and a fallback: CPython's dict
version tags (is a dict unchanged?) and torch.compile's `TensorGuards` (are these tensors as they were?).
Both are private APIs: where this Python or torch lacks one or it misbehaves on its probe, it is None and
the callers compare in Python."""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch


def tensor_guards(tensors: list[torch.Tensor], dynamic_dim0: set[int]) -> Any:
    """torch's own C++ tensor check (what torch.compile's guards use), or None where this torch lacks it or
    it does not behave as relied on: `check(*tensors)` is True only for tensors of the same class, dispatch
    keys, dtype, device, requires_grad, sizes (dim 0 free at `dynamic_dim0`) and strides. ~0.2 us a tensor,
    against ~0.6 us for the same reads in Python."""
    try:
        from torch._C._dynamo.guards import TensorGuards

        sizes = [[None, *t.shape[1:]] if i in dynamic_dim0 else list(t.shape) for i, t in enumerate(tensors)]
        guards = TensorGuards(*tensors, dynamic_dims_sizes=sizes,
                              dynamic_dims_strides=[list(t.stride()) for t in tensors])
        if guards.check(*tensors):
            return guards
    except Exception:  # noqa: BLE001 - a private API: any failure means the Python checks
        pass
    return None


def _dict_versions() -> Callable[[dict], int] | None:
    """CPython's dict version tag (what torch.compile's DICT_VERSION guard reads), or None where this Python
    or torch does not give one that behaves as relied on: a new tag on every change to a dict, so an equal
    tag means an unchanged dict. Python 3.13 deprecates the tag; there the guard compares dicts instead."""
    if not (3, 11) <= sys.version_info[:2] < (3, 13):
        return None
    try:
        from torch._C._dynamo.guards import dict_version

        probe: dict = {"a": 1}
        before = dict_version(probe)
        probe["a"] = 2
        after = dict_version(probe)
        del probe["a"]
        if before != after and dict_version(probe) not in (before, after):
            return dict_version
    except Exception:  # noqa: BLE001 - a private API: any failure means the comparisons
        pass
    return None


dict_version: Callable[[dict], int] | None = _dict_versions()
