"""Erasure code (XOR for m=1, RAID-6 P+Q for m=2) with rotating placement: any m lost members are
rebuilt bitwise, the GF(2^8) arithmetic matches a slow reference, and bad input is refused by name."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from salamander_worker.snapshot import erasure
from salamander_worker.snapshot.erasure import (
    ErasureError,
    StripeRole,
    block_length,
    block_view,
    check_group,
    coefficient,
    encode,
    gf_inv,
    gf_mul,
    gf_scale,
    reconstruct,
    roles,
    solve_stripe,
    xor_into,
)

from tests.unit._support import FAST, QUICK


def ref_mul(a: int, b: int) -> int:
    """Shift-and-add multiply in GF(2^8) modulo x^8 + x^4 + x^3 + x^2 + 1, bit by bit."""
    product = 0
    while b:
        if b & 1:
            product ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
        b >>= 1
    return product


REF = np.array([[ref_mul(a, b) for b in range(256)] for a in range(256)], dtype=np.uint8)


def group(lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n, dtype=np.uint8) for n in lengths]


def blocks_of(payload: np.ndarray, k: int, m: int, block_len: int) -> list[np.ndarray]:
    return [block_view(payload, b, block_len) for b in range(k - m)]


def expected_parities(payloads: list[np.ndarray], m: int, block_len: int) -> list[list[np.ndarray]]:
    """The parities straight from the definition, with the slow reference multiply."""
    k = len(payloads)
    table = roles(k, m)
    result = [[np.zeros(block_len, np.uint8) for _ in range(m)] for _ in range(k)]
    for s in range(k):
        for j, role in enumerate(table[s]):
            if role.kind != "data":
                continue
            block = block_view(payloads[j], role.block, block_len)
            for r in range(m):
                result[(s + r) % k][r] ^= REF[coefficient(r, role.index)][block]
    return result


def assert_rebuilt(payloads, parities, m, lost, lengths, block_len) -> None:
    kept = [None if j in lost else p for j, p in enumerate(payloads)]
    kept_parities = [None if j in lost else p for j, p in enumerate(parities)]
    rebuilt, rebuilt_parities = reconstruct(kept, kept_parities, m, lengths, block_len)
    for j, n in enumerate(lengths):
        assert np.array_equal(rebuilt[j], payloads[j][:n]), f"payload of member {j} (lost {lost})"
        for r in range(m):
            assert np.array_equal(rebuilt_parities[j][r], parities[j][r]), f"parity {r} of member {j}"


# --- encode and reconstruct --------------------------------------------------------------------

@given(m=st.sampled_from([1, 2]), k=st.integers(2, 7), data=st.data(), seed=st.integers(0, 2**16))
@FAST
def test_any_m_lost_members_are_rebuilt_exactly(m: int, k: int, data, seed: int) -> None:
    k = max(k, m + 1)
    lengths = data.draw(st.lists(st.integers(0, 3000), min_size=k, max_size=k), label="lengths")
    lost = data.draw(st.sets(st.integers(0, k - 1), max_size=m), label="lost")
    payloads = group(lengths, seed)
    block_len = block_length(lengths, k, m)
    parities = encode(payloads, m)
    assert all(len(p) == m and all(b.size == block_len for b in p) for p in parities)  # m / (k - m) memory
    assert_rebuilt(payloads, parities, m, lost, lengths, block_len)


@pytest.mark.parametrize("k, m", [(2, 1), (3, 1), (5, 1), (3, 2), (4, 2), (6, 2)])
def test_encode_matches_the_definition_and_every_loss_pattern_is_rebuilt(k: int, m: int,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(erasure, "_CHUNK", 192)  # several chunks per block, cut at the payload ends
    lengths = [0, 1, 700, 64 * (k - m) * 5, 333, 5, 1000][:k]
    payloads = group(lengths, seed=k * 10 + m)
    block_len = block_length(lengths, k, m)
    parities = encode(payloads, m)
    for got, want in zip(parities, expected_parities(payloads, m, block_len)):
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
    for n in range(m + 1):
        for lost in itertools.combinations(range(k), n):
            assert_rebuilt(payloads, parities, m, set(lost), lengths, block_len)


def test_m1_layout_is_plain_rotating_raid5() -> None:
    """m=1: the parity of stripe s is on member s, which puts block s if s < j else s - 1 in it."""
    for k in range(2, 9):
        table = roles(k, 1)
        for s in range(k):
            assert table[s][s] == StripeRole("parity", 0, -1)
            for j in range(k):
                if j != s:
                    assert table[s][j] == StripeRole("data", j if j < s else j - 1, s if s < j else s - 1)
    payloads = group([100, 200, 150])
    parities = encode(payloads, 1, block_len=128)
    assert np.array_equal(parities[0][0], block_view(payloads[1], 0, 128) ^ block_view(payloads[2], 0, 128))


def test_survivors_may_be_longer_than_their_lengths() -> None:
    """Payload buffers padded past the true length (with junk) are encoded as they are; the lost
    member comes back truncated to its length, its parities exact."""
    lengths = [500, 90, 300, 10]
    payloads = group([512, 512, 512, 512], seed=3)
    parities = encode(payloads, 2)
    for lost in [{0}, {1, 3}, {0, 2}]:
        assert_rebuilt(payloads, parities, 2, lost, lengths, 256)


def test_reconstruct_into_preallocated_buffers() -> None:
    lengths = [1000, 900, 1000, 5]
    payloads = group(lengths, seed=4)
    parities = encode(payloads, 2)
    block_len = block_length(lengths, 4, 2)
    out = {j: (np.ones(2 * block_len, np.uint8), [np.ones(block_len, np.uint8) for _ in range(2)]) for j in (1, 3)}
    kept = [None if j in out else p for j, p in enumerate(payloads)]
    kept_parities = [None if j in out else p for j, p in enumerate(parities)]
    rebuilt, rebuilt_parities = reconstruct(kept, kept_parities, 2, lengths, block_len, out=out)
    for j, (payload, blocks) in out.items():
        assert np.shares_memory(rebuilt[j], payload) and np.array_equal(rebuilt[j], payloads[j])
        assert all(a is b and np.array_equal(a, c) for a, b, c in zip(rebuilt_parities[j], blocks, parities[j]))
    for bad, words in [({0: out[1]}, "member 0, which is not lost"), ({1: out[1][0]}, r"out\[1\] must be \(payload"),
                       ({1: (out[1][0][:-64], out[1][1])}, r"out\[1\] payload must be a 1-D array of 1024"),
                       ({1: (out[1][0], out[1][1][:1])}, r"out\[1\] parities must be a list of 2"),
                       ({1: (out[1][0], [parities[0][0], out[1][1][1]])}, "overlaps a survivor"),
                       ({1: out[1], 3: (out[3][0], [out[1][1][0], out[3][1][1]])}, "overlaps .* another output"),
                       ([out[1]], "out must map")]:
        with pytest.raises(ErasureError, match=words):
            reconstruct(kept, kept_parities, 2, lengths, block_len, out=bad)


def test_empty_and_tiny_payloads() -> None:
    payloads = group([0, 0, 0, 0])
    parities = encode(payloads, 2)
    assert block_length([0] * 4, 4, 2) == 64
    assert all(not b.any() for p in parities for b in p)
    assert_rebuilt(payloads, parities, 2, {1, 2}, [0] * 4, 64)


def test_encode_into_preallocated_parities() -> None:
    payloads = group([1000, 900, 1000, 5])
    block_len = block_length([1000, 900, 1000, 5], 4, 2)
    out = [[np.ones(block_len, np.uint8) for _ in range(2)] for _ in range(4)]
    parities = encode(payloads, 2, out=out)
    assert all(p is o for ps, os in zip(parities, out) for p, o in zip(ps, os))
    fresh = encode(payloads, 2)
    assert all(np.array_equal(p, q) for ps, qs in zip(parities, fresh) for p, q in zip(ps, qs))
    with pytest.raises(ErasureError, match="out must be 4 lists"):
        encode(payloads, 2, out=out[:3])
    with pytest.raises(ErasureError, match=r"out\[1\]\[0\] must be a 1-D array of 512 bytes"):
        encode(payloads, 2, out=[out[0], [out[1][0][:-64], out[1][1]], out[2], out[3]])
    with pytest.raises(ErasureError, match=r"out\[2\] must be a list of 2"):
        encode(payloads, 2, out=[out[0], out[1], out[2][:1], out[3]])
    with pytest.raises(ErasureError, match="overlaps the payload of member 0"):
        encode(payloads, 2, out=[out[0], out[1], [payloads[0][:512], out[2][1]], out[3]])
    readonly = out[3][1].copy()
    readonly.flags.writeable = False
    with pytest.raises(ErasureError, match="read-only"):
        encode(payloads, 2, out=[out[0], out[1], out[2], [out[3][0], readonly]])


# --- the per-stripe solver ---------------------------------------------------------------------

@given(m=st.sampled_from([1, 2]), k=st.integers(2, 8), data=st.data(), seed=st.integers(0, 2**16))
@QUICK
def test_solve_stripe_rebuilds_what_reconstruct_does(m: int, k: int, data, seed: int) -> None:
    k = max(k, m + 1)
    lengths = data.draw(st.lists(st.integers(0, 1500), min_size=k, max_size=k), label="lengths")
    stripe = data.draw(st.integers(0, k - 1), label="stripe")
    lost = sorted(data.draw(st.sets(st.integers(0, k - m - 1), min_size=1, max_size=m), label="lost"))
    payloads = group(lengths, seed)
    block_len = block_length(lengths, k, m)
    parities = encode(payloads, m)
    table = roles(k, m)[stripe]
    data_members = {role.index: (j, role.block) for j, role in enumerate(table) if role.kind == "data"}
    rows = [0, 1] if len(lost) == 2 else data.draw(st.sampled_from([[0], [1], [0, 1]][:2 * m - 1]), label="rows")
    syndromes = {}
    for r in rows:
        syndrome = parities[(stripe + r) % k][r].copy()  # parity row r of the stripe
        for i, (j, b) in data_members.items():
            if i not in lost:
                xor_into(syndrome, gf_scale(block_view(payloads[j], b, block_len), coefficient(r, i)))
        syndromes[r] = syndrome
    solved = solve_stripe(k, m, stripe, lost, syndromes)
    members_lost = {data_members[i][0] for i in lost}
    rebuilt, _ = reconstruct([None if j in members_lost else p for j, p in enumerate(payloads)],
                             [None if j in members_lost else p for j, p in enumerate(parities)], m, lengths, block_len)
    assert sorted(solved) == lost
    for i in lost:
        j, b = data_members[i]
        assert np.array_equal(solved[i], block_view(payloads[j], b, block_len))
        assert np.array_equal(solved[i], block_view(rebuilt[j], b, block_len))


def test_solve_stripe_on_large_blocks_and_its_shortcuts() -> None:
    rng = np.random.default_rng(7)
    d1, d3 = rng.integers(0, 256, (2, 300_001), dtype=np.uint8)  # several chunks, an odd tail
    s0 = d1 ^ d3
    s1 = gf_scale(d1, coefficient(1, 1)) ^ gf_scale(d3, coefficient(1, 3))
    got = solve_stripe(6, 2, 4, [3, 1], {0: s0, 1: s1})
    assert np.array_equal(got[1], d1) and np.array_equal(got[3], d3)
    assert solve_stripe(6, 2, 0, [3], {0: d3})[3] is d3  # row 0: the syndrome itself
    assert np.array_equal(solve_stripe(6, 2, 0, [3], {1: gf_scale(d3, 8)})[3], d3)
    assert solve_stripe(6, 2, 0, [], {}) == {}


# --- GF(2^8) -------------------------------------------------------------------------------------

def test_gf_scale_matches_the_reference_for_every_constant() -> None:
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, 4099, dtype=np.uint8)
    src[:256] = np.arange(256)
    for c in range(256):
        want = REF[c][src]
        assert np.array_equal(gf_scale(src, c), want), f"c={c}"
        out = np.empty_like(src)
        assert gf_scale(src, c, out=out) is out and np.array_equal(out, want), f"c={c} into out"
        in_place = src[1:].copy()  # an odd offset and length
        assert gf_scale(in_place, c, out=in_place) is in_place and np.array_equal(in_place, want[1:]), f"c={c}"


def test_gf_scale_over_several_chunks_and_shapes() -> None:
    rng = np.random.default_rng(2)
    src = rng.integers(0, 256, 2 * erasure._CHUNK + 13, dtype=np.uint8)
    for c in (2, 0x47, 0x8E, 0xA7, 0xFF):
        assert np.array_equal(gf_scale(src, c), REF[c][src])
    square = src[:4096].reshape(64, 64)
    assert np.array_equal(gf_scale(square, 0x53), REF[0x53][square])
    strided = np.zeros((64, 64), np.uint8)
    gf_scale(square.T, 0x53, out=strided.T)
    assert np.array_equal(strided, REF[0x53][square])


def test_scalar_field_arithmetic() -> None:
    for a in range(256):
        for b in (0, 1, 2, 3, 0x1D, 0x80, 0xFF, a):
            assert gf_mul(a, b) == ref_mul(a, b)
        if a:
            assert gf_mul(a, gf_inv(a)) == 1
    with pytest.raises(ErasureError, match="no inverse"):
        gf_inv(0)


def test_coefficients() -> None:
    assert all(coefficient(0, i) == 1 for i in range(254))
    q = [coefficient(1, i) for i in range(254)]
    assert q[:9] == [1, 2, 4, 8, 16, 32, 64, 128, 0x1D]
    assert len(set(q)) == 254 and 0 not in q  # distinct and non-zero: any two lost are solvable
    for row, index, words in [(2, 0, "row must be 0 or 1"), (-1, 0, "row must be 0 or 1"),
                              (1, 254, r"data index must be in 0\.\.253"), (0, -1, "data index"),
                              (1.0, 0, "row must be an integer"), (0, True, "data_index must be an integer")]:
        with pytest.raises(ErasureError, match=words):
            coefficient(row, index)


def test_xor_into_on_words_and_on_odd_bytes() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 256, (2, 1001), dtype=np.uint8)
    for dst, src in [(a[:1000], b[:1000]), (a[1:], b[:1000]), (a, b)]:  # words, misaligned, odd size
        want = dst ^ src
        xor_into(dst, src)
        assert np.array_equal(dst, want)


# --- layout --------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 2])
def test_roles_spread_the_parity_evenly(m: int) -> None:
    for k in list(range(m + 1, 12)) + [255]:
        table = roles(k, m)
        assert len(table) == k and all(len(row) == k for row in table)
        for s, row in enumerate(table):
            data = [j for j, role in enumerate(row) if role.kind == "data"]
            assert len(data) == k - m and [row[j].index for j in data] == list(range(k - m))
            assert [row[(s + r) % k] for r in range(m)] == [StripeRole("parity", r, -1) for r in range(m)]
        for j in range(k):
            mine = [table[s][j] for s in range(k)]
            assert sum(role.kind == "parity" for role in mine) == m
            assert [role.block for role in mine if role.kind == "data"] == list(range(k - m))  # in stripe order


def test_check_group() -> None:
    for k, m in [(2, 1), (255, 1), (3, 2), (255, 2)]:
        check_group(k, m)
    for k, m, words in [(1, 1, "needs 2 to 255 members"), (2, 2, "needs 3 to 255"), (256, 1, "got k=256"),
                        (4, 0, "must be 1 or 2"), (4, 3, "must be 1 or 2"), (4.0, 1, "k must be an integer"),
                        (4, "2", "m must be an integer")]:
        with pytest.raises(ErasureError, match=words):
            check_group(k, m)


def test_block_length() -> None:
    assert block_length([0, 0], 2, 1) == 64
    assert block_length([1, 64], 2, 1) == 64
    assert block_length([65, 3], 2, 1) == 128
    assert block_length([129, 3, 0], 3, 1) == 128  # 2 blocks of 128 hold 129 bytes
    assert block_length([1000, 10, 10, 10], 4, 2) == 512
    for lengths in ([1, 1000, 2**20 + 1], [5, 7, 9], [0, 0, 3 * 2**20]):
        for m in (1, 2):
            n = block_length(lengths, 3, m)
            assert n % 64 == 0 and (3 - m) * n >= max(lengths) and (3 - m) * (n - 64) < max(max(lengths), 1)
    for lengths, words in [([1, 2, 3], "3 entries for 4 members"), ([1, 2, -3, 4], ">= 0"),
                           ([1, 2, 3.5, 4], r"payload_lengths\[2\] must be an integer"), ("abcd", "sequence")]:
        with pytest.raises(ErasureError, match=words):
            block_length(lengths, 4, 2)  # type: ignore[arg-type]


def test_block_view() -> None:
    payload = np.arange(200, dtype=np.uint8)
    inside = block_view(payload, 1, 64)
    assert np.shares_memory(inside, payload) and np.array_equal(inside, payload[64:128])
    tail = block_view(payload, 3, 64)
    assert not np.shares_memory(tail, payload)
    assert np.array_equal(tail[:8], payload[192:]) and not tail[8:].any()
    scratch = np.full(64, 7, np.uint8)
    assert block_view(payload, 5, 64, scratch) is scratch and not scratch.any()
    for args, words in [((payload, -1, 64), "block must be >= 0"), ((payload, 0, 100), "multiple of 64"),
                        ((payload, 0, 0), "multiple of 64"), ((payload.astype(np.int16), 0, 64), "uint8"),
                        ((payload, 3, 64, np.zeros(63, np.uint8)), "scratch must be a 1-D array of 64"),
                        ((payload, 3, 64, payload[:64]), "scratch overlaps")]:
        with pytest.raises(ErasureError, match=words):
            block_view(*args)


# --- bad input -----------------------------------------------------------------------------------

def _u8(n: int) -> np.ndarray:
    return np.zeros(n, np.uint8)


@pytest.mark.parametrize("payloads, m, kwargs, words", [
    ([_u8(8)], 1, {}, "needs 2 to 255 members"),
    ([_u8(8), _u8(8)], 2, {}, "needs 3 to 255"),
    ([_u8(8), _u8(8)], 3, {}, "m .* must be 1 or 2"),
    ([_u8(8), np.zeros(8, np.float32)], 1, {}, "payload of member 1 must be a numpy uint8 array, got float32"),
    ([_u8(8), b"12345678"], 1, {}, "payload of member 1 must be a numpy uint8 array, got bytes"),
    ([_u8(8), _u8(16).reshape(2, 8)], 1, {}, "payload of member 1 must be 1-D"),
    ([_u8(8), _u8(200)], 1, {"block_len": 128}, "payload of member 1 is 200 bytes, more than"),
    ([_u8(8), _u8(8)], 1, {"block_len": 96}, "positive multiple of 64"),
    (_u8(16), 1, {}, "sequence of uint8 arrays"),
])
def test_bad_encode_input_is_refused_by_name(payloads, m: int, kwargs, words: str) -> None:
    with pytest.raises(ErasureError, match=words):
        encode(payloads, m, **kwargs)


def test_bad_reconstruct_input_is_refused_by_name() -> None:
    lengths = [100, 100, 100, 100]
    payloads = group(lengths)
    parities = encode(payloads, 2)
    p, q = payloads, parities

    def refused(words: str, payloads=p, parities=q, m=2, lengths=lengths, block_len=64) -> None:
        with pytest.raises(ErasureError, match=words):
            reconstruct(payloads, parities, m, lengths, block_len)

    refused("3 members lost .* at most 2", [None, None, None, p[3]], [None, None, None, q[3]])
    refused("2 members lost .* at most 1", [None, None, *p[2:]], [None, None, *q[2:]], m=1,
            lengths=lengths, block_len=64)
    refused("member 0: give both", [None, *p[1:]], q)
    refused("member 1: give both", p, [q[0], None, *q[2:]])
    refused("4 payloads but 3 parity lists", p, q[:3])
    refused("lengths has 3 entries", lengths=lengths[:3])
    refused(r"lengths\[1\] must be an integer", lengths=[100, "100", 100, 100])
    refused("length of member 2 is 200 bytes, more than", lengths=[100, 100, 200, 100])
    refused("payload of member 1 has 100 bytes; expected 101", lengths=[100, 101, 100, 100])
    refused("payload of member 1 must be a numpy uint8 array", [p[0], p[1].astype(np.int8), *p[2:]])
    refused(r"parities of member 3\[1\] must be a 1-D array of 64 bytes", p, [*q[:3], [q[3][0], q[3][1][:32]]])
    refused("parities of member 2 must be a list of 2", p, [*q[:2], q[2][:1], q[3]])
    refused("block_len must be a positive multiple of 64", block_len=100)
    refused("needs 3 to 255", p[:2], q[:2], lengths=lengths[:2])
    refused("payloads and parities must be sequences", p, None)


def test_bad_solve_stripe_input_is_refused_by_name() -> None:
    s = _u8(64)
    for args, words in [
        ((4, 2, 4, [0], {0: s}), r"stripe must be in 0\.\.3"),
        ((4, 2, 0, [2], {0: s}), r"distinct, in 0\.\.1"),
        ((4, 2, 0, [1, 1], {0: s, 1: s}), "distinct"),
        ((5, 2, 0, [0, 1, 2], {0: s, 1: s}), r"distinct, in 0\.\.2|3 lost data blocks"),
        ((6, 2, 0, [0, 1, 2], {0: s, 1: s}), "3 lost data blocks, but m=2"),
        ((4, 2, 0, [0, 1], {0: s}), "need the syndromes of rows 0 and 1"),
        ((4, 2, 0, [0], {}), "needs the syndrome of row 0 or row 1"),
        ((4, 1, 0, [0], {1: s}), r"rows must be in 0\.\.0"),
        ((4, 2, 0, [0, 1], {0: s, 1: _u8(65)}), "same length"),
        ((4, 2, 0, [0], {1: s.astype(np.int16)}), "syndrome of row 1 must be a numpy uint8 array"),
        ((4, 2, 0, [0], {1: s.reshape(8, 8)}), "1-D"),
        ((4, 2, 0, 0, {0: s}), "lost_data_indices must be a sequence"),
        ((4, 2, 0, [0], [s]), "syndromes must map"),
        ((2, 2, 0, [0], {0: s}), "needs 3 to 255"),
    ]:
        with pytest.raises(ErasureError, match=words):
            solve_stripe(*args)


def test_bad_gf_scale_and_xor_input_is_refused_by_name() -> None:
    src = _u8(64)
    for args, words in [((src, 256), r"c must be a GF\(2\^8\) element in 0\.\.255"), ((src, -1), "0..255"),
                        ((src, 2.0), "c must be an integer"), ((src.astype(np.uint16), 2), "src must be a numpy uint8"),
                        ((src, 2, _u8(63)), "out has shape"), ((src, 2, src.astype(np.int8)), "out must be a numpy uint8"),
                        (([1, 2], 2), "src must be a numpy uint8 array, got list")]:
        with pytest.raises(ErasureError, match=words):
            gf_scale(*args)
    big = _u8(128)
    with pytest.raises(ErasureError, match="partly overlaps"):
        gf_scale(big[:64], 2, out=big[32:96])
    readonly = _u8(64)
    readonly.flags.writeable = False
    for dst, other, words in [(src, _u8(65), "dst has shape"), (readonly, src, "dst is read-only"),
                              (src, src.astype(np.int16), "src must be a numpy uint8"), (None, src, "dst must be")]:
        with pytest.raises(ErasureError, match=words):
            xor_into(dst, other)
