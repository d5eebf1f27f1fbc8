"""Perturbation directions z(seed): counter-based Rademacher signs, the same bits everywhere.

A direction must be reproducible bit for bit by the coordinator, by every data holder and
by export, on CPU or GPU, whatever chunking or torch version each of them uses.
So it is never drawn from ``torch.manual_seed`` + ``torch.randn`` (device dependent); it is a
pure function of ``(seed, tensor_index, element_index)`` evaluated with integer tensor ops
whose results are fully defined: int64 tensors that only ever hold values in ``[0, 2**32)``,
multiplications split so that no product reaches ``2**63`` (no reliance on signed overflow
wrapping), and right shifts only on non-negative values (no arithmetic-shift surprises).

Exact specification (enough to reimplement it elsewhere; all arithmetic on unsigned ints):

* ``mix64(v)`` (the splitmix64 finalizer, modulo ``2**64``)::

      v = v + 0x9E3779B97F4A7C15
      v = (v ^ (v >> 30)) * 0xBF58476D1CE4E5B9
      v = (v ^ (v >> 27)) * 0x94D049BB133111EB
      v = v ^ (v >> 31)

* ``fmix32(h)`` (the murmur3 finalizer, modulo ``2**32``)::

      h ^= h >> 16;  h *= 0x85EBCA6B;  h ^= h >> 13;  h *= 0xC2B2AE35;  h ^= h >> 16

* The key of a stream: ``key = mix64(mix64(mix64(mix64(domain) ^ seed) ^ tensor_index) ^ block)``
  with ``domain = 0`` for directions (``1`` and ``2`` are the subspace projection's signs
  and buckets, see ``parametrizations/subspace.py``), ``k1 = key & 0xFFFFFFFF``,
  ``k2 = key >> 32``.
* Word ``W`` (a 64-bit counter) has ``block = W >> 32`` and ``c = W & 0xFFFFFFFF``;
  its value is ``word(W) = fmix32(fmix32((c + k1) mod 2**32) ^ k2)``.
* Element ``i`` of the direction uses word ``W = i >> 5`` and bit ``b = i & 31``:
  ``z_i = +1`` if ``(word(W) >> b) & 1`` else ``-1``. One hash gives 32 signs, so hashing
  costs 1/32 of the elements; the bits are expanded through a 256-entry byte table.

Speed: generation runs in chunks of ``chunk_elements`` (default 2**20) so the temporaries
stay in cache; docs/architecture.md asks for no more than ``torch.randn`` of the same size
(``bench/bench_directions.py`` measures it). Reference digests of a few directions are
committed in ``common/reference/direction_digests.json`` and checked by the tests.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence

import torch

from sottovoce.common.protocol.limits import UINT64_MAX
from sottovoce.common.steplog import as_float32

MASK32 = 0xFFFFFFFF
MASK64 = UINT64_MAX
DIRECTION_DOMAIN = 0
PROJECTION_SIGN_DOMAIN = 1
PROJECTION_BUCKET_DOMAIN = 2
DEFAULT_CHUNK_ELEMENTS = 1 << 20
BITS_PER_WORD = 32

_FMIX_MUL_1 = 0x85EBCA6B
_FMIX_MUL_2 = 0xC2B2AE35
_REDUCED_FLOATS = (torch.float16, torch.bfloat16)


# -- the hash -----------------------------------------------------------------------------
def mix64(value: int) -> int:
    """splitmix64's finalizer on a Python int (exact, modulo 2**64): derives stream keys."""
    v = (value + 0x9E3779B97F4A7C15) & MASK64
    v = ((v ^ (v >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    v = ((v ^ (v >> 27)) * 0x94D049BB133111EB) & MASK64
    return v ^ (v >> 31)


def stream_key(domain: int, seed: int, tensor_index: int, block: int) -> tuple[int, int]:
    """The two 32-bit keys ``(k1, k2)`` of one stream block (see the module docstring)."""
    _check_uint64("seed", seed)
    _check_uint64("tensor_index", tensor_index)
    key = mix64(mix64(mix64(mix64(domain) ^ seed) ^ tensor_index) ^ block)
    return key & MASK32, key >> 32


def _mul32_(h: torch.Tensor, constant: int) -> torch.Tensor:
    """``h * constant mod 2**32`` for int64 ``h`` in [0, 2**32), with no product >= 2**48.

    Splitting the constant into 16-bit halves keeps every intermediate far below 2**63, so
    the result never depends on how a platform handles signed overflow. Modifies ``h``.
    """
    high = h * (constant >> 16)
    high &= 0xFFFF
    high <<= 16
    h *= constant & 0xFFFF
    h += high
    h &= MASK32
    return h


def _fmix32_(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on int64 values in [0, 2**32); modifies ``h``."""
    h ^= h >> 16
    _mul32_(h, _FMIX_MUL_1)
    h ^= h >> 13
    _mul32_(h, _FMIX_MUL_2)
    h ^= h >> 16
    return h


def hash_words(
    domain: int,
    seed: int,
    tensor_index: int,
    first_word: int,
    count: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Words ``first_word .. first_word + count - 1`` of a stream, as int64 in [0, 2**32).

    ``domain`` separates users of the same seed (directions vs. the subspace projection), so
    a projection never correlates with a direction that happens to share its seed.
    """
    pieces: list[torch.Tensor] = []
    done = 0
    while done < count or not pieces:  # a block spans 2**32 words: one piece in practice
        word = first_word + done
        block, counter = word >> 32, word & MASK32
        length = min(count - done, (1 << 32) - counter)
        k1, k2 = stream_key(domain, seed, tensor_index, block)
        h = torch.arange(counter, counter + length, dtype=torch.int64, device=device)
        pieces.append(_mix_(h, k1, k2))
        done += length
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _mix_(h: torch.Tensor, k1: int | torch.Tensor, k2: int | torch.Tensor) -> torch.Tensor:
    """The words of word counters ``h`` under a stream key ``(k1, k2)``, in place.

    The keys are one stream's (ints) or one per counter (int64 tensors, for many streams at
    once): the one definition of a word, so every way of drawing directions agrees bit
    for bit.
    """
    h += k1
    h &= MASK32
    _fmix32_(h)
    h ^= k2
    return _fmix32_(h)


# -- expanding words into signs ------------------------------------------------------------
_BYTE_SHIFTS: dict[torch.device, torch.Tensor] = {}
_SIGN_TABLES: dict[torch.device, torch.Tensor] = {}


def _byte_shifts(device: torch.device) -> torch.Tensor:
    if device not in _BYTE_SHIFTS:
        _BYTE_SHIFTS[device] = torch.tensor([0, 8, 16, 24], dtype=torch.int64, device=device)
    return _BYTE_SHIFTS[device]


def _sign_table(device: torch.device) -> torch.Tensor:
    """256 int64 entries whose 8 bytes (in memory order) are the int8 signs of a byte's bits.

    Entry ``v`` holds ``+1`` at byte ``k`` if bit ``k`` of ``v`` is set, else ``-1``. It is
    built as a (256, 8) int8 table and reinterpreted, and the gathered result is
    reinterpreted back, so the byte order of the machine cancels out.
    """
    if device not in _SIGN_TABLES:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8).unsqueeze(0)) & 1
        signs = (bits * 2 - 1).to(torch.int8).contiguous()
        _SIGN_TABLES[device] = signs.view(torch.int64).view(256).to(device)
    return _SIGN_TABLES[device]


def expand_signs(words: torch.Tensor) -> torch.Tensor:
    """Expand each 32-bit word into its 32 signs, lowest bit first, as int8."""
    byte_values = (words.unsqueeze(1) >> _byte_shifts(words.device)) & 0xFF
    packed = torch.index_select(_sign_table(words.device), 0, byte_values.view(-1))
    return packed.view(torch.int8)


def sign_chunks(
    seed: int,
    tensor_index: int,
    numel: int,
    *,
    device: torch.device | str = "cpu",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, signs)`` covering z[0:numel] in order; ``signs`` is int8 ±1.

    Any ``chunk_elements >= 1`` yields the same bits: a chunk that starts or ends inside a
    word hashes that whole word and slices it.
    """
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    _check_uint64("seed", seed)
    device = torch.device(device)
    for start in range(0, numel, chunk_elements):
        end = min(numel, start + chunk_elements)
        first_word = start // BITS_PER_WORD
        last_word = (end - 1) // BITS_PER_WORD
        words = hash_words(
            DIRECTION_DOMAIN, seed, tensor_index, first_word, last_word - first_word + 1, device
        )
        offset = start - first_word * BITS_PER_WORD
        yield start, expand_signs(words)[offset : offset + end - start]


# -- public API ------------------------------------------------------------------------------
def rademacher(
    seed: int,
    tensor_index: int,
    numel: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """The flat direction z(seed, tensor_index) of ``numel`` elements, each exactly ±1."""
    out = torch.empty(numel, dtype=dtype, device=device)
    for start, signs in sign_chunks(
        seed, tensor_index, numel, device=device, chunk_elements=chunk_elements
    ):
        out[start : start + signs.numel()].copy_(signs)
    return out


def rademacher_many(
    streams: Sequence[tuple[int, int, int]],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """``[rademacher(seed, tensor_index, numel) for (seed, tensor_index, numel) in streams]``.

    The same bits as one call per stream (element for element the same hash of the same
    ``(seed, tensor_index, element)``), hashed in one vectorized pass over all streams'
    words: many short directions (a population's low-rank factors: thousands of vectors of
    a few hundred elements) cost a few tensor ops in all instead of a few dozen each. The
    results are views into one flat tensor. A stream longer than one key block
    (``2**32`` words) is generated by :func:`rademacher` alone.
    """
    device = torch.device(device)
    if not streams:
        return []
    words = []
    for _seed, _index, numel in streams:
        if numel < 0:
            raise ValueError(f"numel must be >= 0, got {numel}")
        words.append(-(-numel // BITS_PER_WORD))
    if any(count > 1 << 32 for count in words):
        return [rademacher(s, t, n, dtype=dtype, device=device) for s, t, n in streams]
    keys = [stream_key(DIRECTION_DOMAIN, seed, index, 0) for seed, index, _ in streams]
    counts = torch.tensor(words, dtype=torch.int64)
    starts = torch.cumsum(counts, 0) - counts
    total = int(counts.sum())
    # the counter of each word within its own stream (block 0: every counter < 2**32)
    counters = torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(starts, counts)
    h = counters.to(device)

    def per_word(key: int) -> torch.Tensor:  # each stream's key half, on each of its words
        values = torch.tensor([pair[key] for pair in keys], dtype=torch.int64)
        return torch.repeat_interleave(values, counts).to(device)

    signs = expand_signs(_mix_(h, per_word(0), per_word(1))).to(dtype)
    return [
        signs[BITS_PER_WORD * start : BITS_PER_WORD * start + numel]
        for start, (_, _, numel) in zip(starts.tolist(), streams, strict=True)
    ]


def add_scaled_direction_(
    tensor: torch.Tensor,
    seed: int,
    tensor_index: int,
    coefficient: float,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> None:
    """In place ``tensor += coefficient * z(seed, tensor_index)``, chunk by chunk.

    ``coefficient`` must be a float32 value (a Step's coefficient is). Since ``z`` is ±1,
    ``coefficient * z`` is exactly ``±coefficient``, and each element receives exactly one
    rounded add (so the result is the same on every device and for every chunking):

    * float32 / float64 tensors: ``t + (±c)`` correctly rounded in the tensor's dtype;
    * float16 / bfloat16 tensors: ``round_to_dtype(round_to_float32(t + (±c)))``: the add
      is done in float32 and the sum rounded (to nearest even) to the tensor's dtype.

    No full-size temporary: peak extra memory is one chunk.
    """
    if not tensor.is_floating_point():
        raise ValueError(f"add_scaled_direction_ needs a floating-point tensor, got {tensor.dtype}")
    _check_float32("coefficient", coefficient)
    with torch.no_grad():
        flat = tensor.view(-1) if tensor.is_contiguous() else tensor.contiguous().view(-1)
        for start, signs in sign_chunks(
            seed, tensor_index, flat.numel(), device=flat.device, chunk_elements=chunk_elements
        ):
            delta = signs.to(torch.float32).mul_(coefficient)  # exactly ±coefficient
            add_float32_(flat[start : start + signs.numel()], delta)
        if flat.data_ptr() != tensor.data_ptr():
            tensor.copy_(flat.view_as(tensor))


def add_float32_(target: torch.Tensor, delta: torch.Tensor) -> None:
    """``target += delta`` for a float32 ``delta``, with the rounding rule stated above."""
    if target.dtype in _REDUCED_FLOATS:
        target.copy_(target.to(torch.float32).add_(delta))
    else:
        target.add_(delta)


def direction_digest(seed: int, tensor_index: int, numel: int) -> str:
    """sha256 (hex) of z(seed, tensor_index)[0:numel] written as int8 bytes (+1 = 0x01)."""
    digest = hashlib.sha256()
    for _, signs in sign_chunks(seed, tensor_index, numel):
        digest.update(signs.cpu().numpy().tobytes())
    return digest.hexdigest()


# -- validation ---------------------------------------------------------------------------------
def _check_uint64(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= UINT64_MAX:
        raise ValueError(f"{name} must be an integer in [0, 2**64), got {value!r}")


def _check_float32(name: str, value: float) -> None:
    if not math.isfinite(value) or as_float32(value) != value:
        raise ValueError(f"{name} {value!r} is not a finite float32 value")
