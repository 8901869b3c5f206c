"""kernels/input_ids.py: async scheduling's placeholder input ids, resolved in place."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from minivllm.kernels import reference
from minivllm.kernels.input_ids import resolve_placeholders


@pytest.mark.parametrize("n", [1, 7, 1500])
def test_resolve_placeholders_matches_reference(n: int) -> None:
    rng = np.random.default_rng(n)
    ids = rng.integers(0, 1000, n).astype(np.int32)
    mask = rng.random(n) < 0.4
    ids[mask] = -rng.integers(1, 9, int(mask.sum()))
    prev = torch.from_numpy(rng.integers(0, 10**6, 8))
    a, b = torch.from_numpy(ids.copy()), torch.from_numpy(ids.copy())
    resolve_placeholders(a, prev)
    reference.resolve_placeholders(b, prev)
    assert torch.equal(a, b)
    assert torch.equal(a[~torch.from_numpy(mask)], torch.from_numpy(ids[~mask]))
    assert (a >= 0).all()
