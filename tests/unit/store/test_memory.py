"""The host-memory tier: byte budget and LRU order (pure, no vLLM)."""

from __future__ import annotations

import numpy as np

from cwm_connector.store.memory import MemoryTier


def blob(seed: int, size: int = 100) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def test_budget_is_never_exceeded_and_lru_goes_first() -> None:
    tier = MemoryTier(budget_bytes=350)
    for i in range(3):
        assert tier.put(key(i), blob(i))
    assert tier.get(key(0)) is not None  # 0 is now most recently used; 1 is the oldest
    assert tier.put(key(3), blob(3))
    assert tier.nbytes <= 350 and len(tier) == 3
    assert not tier.contains(key(1))
    assert all(tier.contains(key(i)) for i in (0, 2, 3))
    assert tier.evictions == 1
    np.testing.assert_array_equal(tier.get(key(3)), blob(3))
    for i in range(4, 40):  # a long stream of puts keeps the bound
        tier.put(key(i), blob(i, size=30 + i))
        assert tier.nbytes <= 350


def test_a_put_that_cannot_fit_is_refused_and_loses_nothing() -> None:
    tier = MemoryTier(budget_bytes=250)
    assert tier.put(key(0), blob(0)) and tier.put(key(1), blob(1))
    assert not tier.put(key(3), blob(3, size=1000))  # larger than the whole budget
    assert tier.contains(key(0)) and tier.contains(key(1)) and tier.nbytes == 200
    assert tier.evictions == 0
    assert not tier.put(key(0), blob(0, size=400))  # a refused replacement keeps the old bytes
    np.testing.assert_array_equal(tier.get(key(0)), blob(0))
    assert tier.put(key(0), blob(0, size=160))  # a replacement that fits evicts the oldest
    assert not tier.contains(key(1)) and tier.nbytes == 160
    assert tier.delete(key(0)) and not tier.delete(key(0)) and tier.nbytes == 0
