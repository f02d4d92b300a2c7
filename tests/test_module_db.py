"""torch's own module samples (module_db) for Softmax, LogSoftmax, MaxPool2d, AdaptiveMaxPool2d and LPPool2d:
built from their constructor args, run on their inputs in training and eval mode, fused and unfused; output,
every gradient and every buffer against float64 torch. (CrossEntropyLoss and NLLLoss: tests/test_losses.py.)"""
from __future__ import annotations

import pytest
import torch.nn as nn

import fusednn
from tests.opcheck import build, check_module, module_samples

# Samples fusednn refuses (module kind -> the op named in the error), with the reason; each must raise
# UnsupportedOpError naming the op and the call. None today: every sample of these modules is supported.
REFUSED: dict[str, str] = {}


def _key(info, sample) -> str:
    name = info.module_cls.__name__
    return f"{name}(return_indices)" if sample.constructor_input.kwargs.get("return_indices") else name


CASES = [(training, fuse, info, s) for cls in (nn.Softmax, nn.LogSoftmax, nn.MaxPool2d, nn.AdaptiveMaxPool2d,
                                                nn.LPPool2d)
         for training in (True, False) for info, s in module_samples(cls, training) for fuse in (True, False)]


@pytest.mark.parametrize("training,fuse,info,sample", CASES,
                         ids=[f"{i.module_cls.__name__}-{k}-{'train' if t else 'eval'}-{'fused' if f else 'unfused'}"
                              for k, (t, f, i, _) in enumerate(CASES)])
def test_module_db_samples_match_torch_or_are_refused_by_name(training, fuse, info, sample):
    m, xs, kw = build(info, sample, training)
    refused = REFUSED.get(_key(info, sample))
    if refused is None:
        check_module(m, xs, fuse=fuse, kwargs=kw)
        return
    with pytest.raises(fusednn.UnsupportedOpError, match=rf"{refused}.*\(opcheck.py:\d+\)"):
        check_module(m, xs, fuse=fuse, kwargs=kw)
