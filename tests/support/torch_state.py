"""Torch state comparisons the recovery tests share."""

from __future__ import annotations

import torch


def assert_same_state(a: dict, b: dict) -> None:  # type: ignore[type-arg]
    assert a.keys() == b.keys()
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, dict):
            assert_same_state(va, vb)
        elif isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), k
        elif isinstance(va, list):
            assert len(va) == len(vb)
            for x, y in zip(va, vb, strict=True):
                if isinstance(x, dict):
                    assert_same_state(x, y)
                else:
                    assert x == y
        else:
            assert va == vb, k
