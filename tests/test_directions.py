"""Directions z(seed): committed bits, chunking/device invariance, balance, the stated spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sottovoce.common import directions
from sottovoce.common.directions import (
    DIRECTION_DOMAIN,
    MASK32,
    add_scaled_direction_,
    direction_digest,
    hash_words,
    rademacher,
    rademacher_many,
)
from sottovoce.common.steplog import as_float32

REFERENCE = Path(directions.__file__).parent / "reference" / "direction_digests.json"


def _reference_cases() -> list[dict[str, int | str]]:
    cases: list[dict[str, int | str]] = json.loads(REFERENCE.read_text())["cases"]
    return cases


# -- the committed bits ---------------------------------------------------------------------------
def test_reference_file_covers_the_edge_cases() -> None:
    cases = _reference_cases()
    seeds = {c["seed"] for c in cases}
    sizes = [int(c["numel"]) for c in cases]
    assert {0, 2**64 - 1} <= seeds
    assert any(n % 32 for n in sizes) and any(n > (1 << 20) and n % (1 << 20) for n in sizes)
    assert max(sizes) >= 3_000_000


@pytest.mark.parametrize("case", _reference_cases(), ids=lambda c: f"{c['seed']}-{c['numel']}")
def test_digest_matches_committed_reference(case: dict[str, int | str]) -> None:
    seed, index, numel = int(case["seed"]), int(case["tensor_index"]), int(case["numel"])
    assert direction_digest(seed, index, numel) == case["sha256"]


# -- the docstring spec, reimplemented with Python ints -------------------------------------------
def _fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & MASK32
    return h ^ (h >> 16)


def _spec_signs(seed: int, tensor_index: int, first_element: int, count: int) -> list[int]:
    """z from the module docstring alone, so the documented spec and the code cannot drift."""
    signs = []
    for i in range(first_element, first_element + count):
        word_index = i >> 5
        k1, k2 = directions.stream_key(DIRECTION_DOMAIN, seed, tensor_index, word_index >> 32)
        word = _fmix32(_fmix32(((word_index & MASK32) + k1) & MASK32) ^ k2)
        signs.append(1 if (word >> (i & 31)) & 1 else -1)
    return signs


def test_mix64_matches_the_documented_splitmix64() -> None:
    # splitmix64's first output for state 0 is the published constant.
    assert directions.mix64(0) == 0xE220A8397B1DCDAF


@pytest.mark.parametrize("seed", [0, 1, 2**63 + 5, 2**64 - 1])
def test_generator_follows_the_documented_spec(seed: int) -> None:
    expected = _spec_signs(seed, 3, 0, 200)
    assert rademacher(seed, 3, 200).to(torch.int64).tolist() == expected


def test_stream_blocks_beyond_2_to_32_words_follow_the_spec() -> None:
    first_word = (1 << 32) - 2
    words = hash_words(DIRECTION_DOMAIN, 9, 1, first_word, 4)
    parts = torch.cat(
        [
            hash_words(DIRECTION_DOMAIN, 9, 1, first_word, 2),
            hash_words(DIRECTION_DOMAIN, 9, 1, first_word + 2, 2),
        ]
    )
    assert torch.equal(words, parts)
    for offset in range(4):
        w = first_word + offset
        k1, k2 = directions.stream_key(DIRECTION_DOMAIN, 9, 1, w >> 32)
        assert int(words[offset]) == _fmix32(_fmix32(((w & MASK32) + k1) & MASK32) ^ k2)


# -- invariance ------------------------------------------------------------------------------------
def test_any_chunking_gives_the_same_bits() -> None:
    small = rademacher(77, 2, 3001)
    for chunk in (1, 7, 1000, 1 << 20):
        assert torch.equal(rademacher(77, 2, 3001, chunk_elements=chunk), small), chunk
    large = rademacher(78, 0, 2_100_003)
    for chunk in (1000, 1 << 20):
        assert torch.equal(rademacher(78, 0, 2_100_003, chunk_elements=chunk), large), chunk
    assert torch.equal(rademacher(78, 0, 1000), large[:1000])  # a prefix is a prefix


def test_values_are_exactly_plus_minus_one_in_every_dtype() -> None:
    reference = rademacher(5, 1, 4099)
    assert set(reference.unique().tolist()) == {-1.0, 1.0}
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.int8):
        z = rademacher(5, 1, 4099, dtype=dtype)
        assert z.dtype == dtype and torch.equal(z.to(torch.float32), reference)


def test_many_streams_at_once_give_each_stream_its_own_bits() -> None:
    """The vectorized form hashes all streams' words in one pass: each result must equal its
    own rademacher call (odd lengths, word boundaries, empty, extreme seeds and indices)."""
    streams = [
        (0, 0, 1),
        (2**64 - 1, 2**64 - 1, 33),
        (7, 3, 0),
        (7, 3, 4099),
        (7, 4, 32),
        (8, 4, 64),
        (123456789, 2, 1536),
        (123456789, 3, 31),
    ]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        many = rademacher_many(streams, dtype=dtype)
        assert len(many) == len(streams)
        for got, (seed, index, numel) in zip(many, streams, strict=True):
            assert got.dtype == dtype and got.shape == (numel,)
            assert torch.equal(got, rademacher(seed, index, numel, dtype=dtype)), (seed, index)
    assert rademacher_many([]) == []
    with pytest.raises(ValueError):
        rademacher_many([(1, 0, -1)])
    with pytest.raises(ValueError):
        rademacher_many([(2**64, 0, 10)])


def test_rejects_bad_seed_and_sizes() -> None:
    with pytest.raises(ValueError, match="seed"):
        rademacher(2**64, 0, 10)
    with pytest.raises(ValueError, match="seed"):
        rademacher(-1, 0, 10)
    with pytest.raises(ValueError, match="chunk_elements"):
        rademacher(0, 0, 10, chunk_elements=0)
    assert rademacher(0, 0, 0).numel() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_give_the_same_bits() -> None:
    for seed, numel in ((0, 1000), (2**64 - 1, 3_000_001), (12345, 33)):
        cpu = rademacher(seed, 4, numel)
        gpu = rademacher(seed, 4, numel, device="cuda")
        assert torch.equal(gpu.cpu(), cpu)
    weights = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        on_cpu, on_gpu = weights.to(dtype), weights.to(dtype).cuda()
        add_scaled_direction_(on_cpu, 3, 1, as_float32(1e-3))
        add_scaled_direction_(on_gpu, 3, 1, as_float32(1e-3))
        assert torch.equal(on_gpu.cpu().view(torch.uint8), on_cpu.view(torch.uint8)), dtype


# -- statistics (can fail if the generator is broken; ~1e-6 false alarm rate each) -----------------
def test_signs_are_balanced_and_uncorrelated() -> None:
    n = 1 << 20
    z = rademacher(2024, 0, n)
    sigma = n**0.5
    assert abs(float(z.sum())) < 5 * sigma
    for lag in (1, 2, 31, 32, 33):
        assert abs(float((z[lag:] * z[:-lag]).sum())) < 5 * sigma, lag
    per_bit = z.view(-1, 32).sum(0)  # each of the 32 bit positions of a word is balanced
    assert per_bit.abs().max() < 5 * (n / 32) ** 0.5
    assert not torch.equal(z[: n // 2], z[n // 2 :])


def test_different_seeds_and_tensor_indices_differ() -> None:
    n = 1 << 16
    base = rademacher(10, 0, n)
    for other in (rademacher(11, 0, n), rademacher(10, 1, n), rademacher(10 + 2**32, 0, n)):
        agreement = float((base == other).to(torch.float32).mean())
        assert abs(agreement - 0.5) < 5 * 0.5 / n**0.5


# -- adding a scaled direction ---------------------------------------------------------------------
def test_add_scaled_direction_is_one_exact_add_in_float32_and_float64() -> None:
    gen = torch.Generator().manual_seed(1)
    c = as_float32(0.0137)
    for dtype in (torch.float32, torch.float64):
        weights = torch.randn(4, 777, generator=gen, dtype=dtype)
        expected = weights + torch.tensor(c, dtype=dtype) * rademacher(8, 2, weights.numel()).to(
            dtype
        ).view_as(weights)
        add_scaled_direction_(weights, 8, 2, c)
        assert torch.equal(weights, expected), dtype


def test_add_scaled_direction_reduced_precision_rounds_once_from_float32() -> None:
    base = torch.randn(3000, generator=torch.Generator().manual_seed(2))
    c = as_float32(1e-3)
    z = rademacher(4, 0, base.numel())
    for dtype in (torch.bfloat16, torch.float16):
        weights = base.to(dtype)
        expected = (weights.to(torch.float32) + c * z).to(dtype)
        add_scaled_direction_(weights, 4, 0, c)
        assert torch.equal(weights, expected)
        assert not torch.equal(weights, base.to(dtype))  # the step is not lost in rounding


def test_add_scaled_direction_is_chunking_invariant_and_checks_its_inputs() -> None:
    base = torch.randn(5003, generator=torch.Generator().manual_seed(3))
    first, second = base.clone(), base.clone()
    add_scaled_direction_(first, 6, 1, 0.5)
    add_scaled_direction_(second, 6, 1, 0.5, chunk_elements=7)
    assert torch.equal(first, second)
    with pytest.raises(ValueError, match="float32"):
        add_scaled_direction_(first, 6, 1, 0.1)  # 0.1 is not a float32 value
    with pytest.raises(ValueError, match="floating-point"):
        add_scaled_direction_(torch.zeros(3, dtype=torch.int32), 6, 1, 0.5)


def test_add_scaled_direction_on_a_non_contiguous_tensor() -> None:
    matrix = torch.zeros(6, 5)
    column_major = matrix.t()  # shape (5, 6), not contiguous
    add_scaled_direction_(column_major, 1, 0, 2.0)
    expected = 2.0 * rademacher(1, 0, 30).view(5, 6)  # z follows the tensor's logical order
    assert torch.equal(column_major, expected)
