"""XOR parity with rotating placement: any one lost node is rebuilt exactly, bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from salamander_worker.snapshot.erasure import ErasureError, block_of, encode, padded_length, rebuild
from tests.unit._support import FAST


def group(k: int, length: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    size = padded_length(length, k)
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(k)]


@given(k=st.integers(2, 7), length=st.integers(1, 5000), lost=st.integers(0, 6), seed=st.integers(0, 2**16))
@FAST
def test_any_one_lost_node_is_rebuilt_exactly(k: int, length: int, lost: int, seed: int) -> None:
    lost %= k
    buffers = group(k, length, seed)
    parities = encode(buffers)
    assert all(p.size == buffers[0].size // (k - 1) for p in parities)  # the 1/(k-1) memory cost
    survivors = [None if n == lost else b for n, b in enumerate(buffers)]
    kept = [None if n == lost else p for n, p in enumerate(parities)]
    buffer, parity = rebuild(survivors, kept)
    assert np.array_equal(buffer, buffers[lost]) and np.array_equal(parity, parities[lost])


def test_every_stripe_takes_one_block_from_every_other_node() -> None:
    for k in range(2, 8):
        for node in range(k):
            assert sorted(block_of(node, s) for s in range(k) if s != node) == list(range(k - 1))
    with pytest.raises(ErasureError, match="holds the parity"):
        block_of(2, 2)


def test_padding_gives_whole_words_per_block() -> None:
    assert padded_length(1, 4) == 24 and padded_length(25, 4) == 48 and padded_length(0, 2) == 8
    with pytest.raises(ErasureError, match="at least 2 nodes"):
        padded_length(10, 1)


@pytest.mark.parametrize("buffers, words", [
    ([np.zeros(8, np.uint8)], "at least 2 nodes"),
    ([np.zeros(9, np.uint8), np.zeros(9, np.uint8), np.zeros(9, np.uint8)], "multiple of"),
    ([np.zeros(8, np.uint8), np.zeros(16, np.uint8)], "differ in length"),
    ([np.zeros(8, np.float32), np.zeros(8, np.float32)], "uint8"),
])
def test_bad_buffers_are_refused_by_name(buffers, words: str) -> None:
    with pytest.raises(ErasureError, match=words):
        encode(buffers)


def test_rebuild_needs_exactly_one_loss_and_matching_parities() -> None:
    buffers = group(3, 100)
    parities = encode(buffers)
    with pytest.raises(ErasureError, match="exactly one"):
        rebuild(buffers, parities)
    with pytest.raises(ErasureError, match="exactly one"):
        rebuild([None, None, buffers[2]], [None, None, parities[2]])
    with pytest.raises(ErasureError, match="parity of node 1"):
        rebuild([None, buffers[1], buffers[2]], [None, parities[1][:-8], parities[2]])
    with pytest.raises(ErasureError, match="3 buffers but 2"):
        rebuild([None, buffers[1], buffers[2]], [None, parities[1]])


def test_encode_into_preallocated_parities() -> None:
    buffers = group(4, 1000)
    out = [np.zeros(buffers[0].size // 3, np.uint8) for _ in range(4)]
    parities = encode(buffers, out=out)
    assert all(p is o for p, o in zip(parities, out))
    assert all(np.array_equal(p, q) for p, q in zip(parities, encode(buffers)))
    with pytest.raises(ErasureError, match="out must be 4 uint8 arrays"):
        encode(buffers, out=out[:3])
