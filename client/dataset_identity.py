"""Which lifetime ledger a data set has: keyed on its records, not on its file's bytes.

A budget belongs to the records. The same records saved with a blank line more, as TSV
instead of JSON lines, or in another order, are the same data set and must find the same
ledger, or re-exporting a file would reset its budget. So the holder computes, for every
record, a keyed digest ``HMAC-SHA256(key, normalized record)`` with a secret key of its own
(``holder.key`` in the ledger folder, 0600, made on first use), and a data set is the
multiset of its records' digests: its id is a keyed hash of the sorted digests.

The digests are keyed because a plain hash of a record is a membership oracle to whoever
reads the ledger folder ("is this text in the data set?"); without the key they say nothing.

A data set that overlaps another ledger's records (the data grew, was subset, or was
merged) inherits what those records already cost: for each record, the sum of the own
releases of every ledger that holds it, and the data set starts at the worst such record
(bits, and the pointwise largest RDP curve for epsilon). It is recomputed from the ledgers'
own records on every open, so spending on either side later is seen by the other the next
time it opens. The operator is told (``Inheritance.describe``).

The same key assigns records to the secret chunks of chunk-vote answers
(:func:`chunk_assignment`): a record's chunk is a keyed hash of its digest, so it depends on
that record alone (adding or removing one record moves no other) and, without the key,
nobody can tell which records share a chunk.

Normalization: field names and string values in Unicode NFC with surrounding whitespace
removed; integers, floats and booleans as their canonical text (so ``1`` in JSON and
``"1"`` in TSV are the same label); anything nested as canonical JSON.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sottovoce.client.ledger import Inheritance, Ledger, PrivacyLimit
from sottovoce.common.accounting import events_curve
from sottovoce.common.errors import ConfigError, LogIntegrityError
from sottovoce.common.protocol.limits import MAX_CHUNKS
from sottovoce.common.storage import PRIVATE, atomic_write_text, canonical_json

KEY_FILE = "holder.key"
INDEX_SUFFIX = ".records"
LEDGER_SUFFIX = ".ledger.jsonl"
DIGEST_BYTES = 32
_KEY_HEX = 64
_CHUNK_LABEL = b"sottovoce-chunk-v1\n"


@dataclass(frozen=True)
class DatasetIdentity:
    """A data set as its holder knows it: an id and the set of its records' keyed digests."""

    dataset_id: str
    digests: frozenset[bytes]
    records: int


@dataclass(frozen=True)
class _Neighbour:
    dataset_id: str
    digests: frozenset[bytes]
    bits: float
    curve: np.ndarray = field(compare=False)


# -- the key -----------------------------------------------------------------------------------
def holder_key(ledger_dir: Path, *, create: bool) -> bytes | None:
    """The holder's secret key for record digests; made on first use when ``create``.

    Refuses to make a new key where record indexes already exist: they were keyed with a
    lost key, and a new one would give every data set a new, empty ledger.
    """
    path = Path(ledger_dir) / KEY_FILE
    if path.exists():
        text = _read_text(path).strip()
        if len(text) != _KEY_HEX or any(c not in "0123456789abcdef" for c in text):
            raise ConfigError(f"{path}: not a holder key (64 lowercase hex digits)")
        return bytes.fromhex(text)
    if not create:
        return None
    if any(Path(ledger_dir).glob(f"*{INDEX_SUFFIX}")):
        raise ConfigError(
            f"{path}: missing, but {ledger_dir} holds record indexes made with it; restore "
            "the key (a new one would give every data set an empty ledger)"
        )
    atomic_write_text(path, secrets.token_hex(_KEY_HEX // 2) + "\n", mode=PRIVATE)
    return bytes.fromhex(_read_text(path).strip())


# -- digests -----------------------------------------------------------------------------------
def normalized_record(record: Mapping[str, object]) -> bytes:
    """The record's fields as canonical bytes (see the module doc for the rules)."""
    fields = {_text(str(name)): _value(value) for name, value in record.items()}
    return canonical_json(fields, ensure_ascii=False).encode()


def _text(value: str) -> str:
    return unicodedata.normalize("NFC", value).strip()


def _value(value: object) -> str:
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
        return repr(value)
    if value is None:
        return ""
    return canonical_json(value, ensure_ascii=False)


def record_digest(record: Mapping[str, object], key: bytes) -> bytes:
    """The record's keyed digest: ``HMAC-SHA256(key, normalized record)``."""
    return hmac.new(key, normalized_record(record), hashlib.sha256).digest()


def chunk_assignment(
    records: Sequence[Mapping[str, object]], key: bytes, chunks: int
) -> np.ndarray:
    """Each record's chunk in ``0 .. chunks - 1``, from the holder's key: an int64 array.

    ``HMAC-SHA256(key, "sottovoce-chunk-v1" + digest)`` read as a 64-bit integer, mod K: a
    function of the record alone, so one record added or removed changes its own chunk and
    no other (equal-size chunks cut from a permutation would shift every boundary). The
    label is a domain separation from the data set id, under the same single secret. The
    bias of a 64-bit value mod K <= 2**20 is below 2**-44. Two copies of one record share a
    chunk (they are one record twice, and the ledger counts them so).
    """
    if not 1 <= chunks <= MAX_CHUNKS:
        raise ValueError(f"chunks must be in 1..{MAX_CHUNKS} (got {chunks})")
    assigned = np.empty(len(records), dtype=np.int64)
    for index, record in enumerate(records):
        tag = hmac.new(key, _CHUNK_LABEL + record_digest(record, key), hashlib.sha256).digest()
        assigned[index] = int.from_bytes(tag[:8], "big") % chunks
    return assigned


def identify(records: Iterable[Mapping[str, object]], key: bytes) -> DatasetIdentity:
    """The data set's id (keyed hash of its sorted record digests) and its digests."""
    digests = [record_digest(r, key) for r in records]
    mac = hmac.new(key, b"sottovoce-dataset-v1", hashlib.sha256)
    for digest in sorted(digests):  # a multiset: a duplicated record counts twice
        mac.update(digest)
    return DatasetIdentity(mac.hexdigest(), frozenset(digests), len(digests))


# -- record indexes ----------------------------------------------------------------------------
def write_index(ledger_dir: Path, dataset_id: str, digests: Iterable[bytes]) -> None:
    """``<id>.records``: the data set's sorted record digests, for later overlap checks."""
    data = b"".join(sorted(set(digests)))
    path = Path(ledger_dir) / f"{dataset_id}{INDEX_SUFFIX}"
    atomic_write_text(path, data.hex(), mode=PRIVATE)


def read_index(path: Path) -> frozenset[bytes]:
    text = _read_text(path).strip()
    try:
        data = bytes.fromhex(text)
    except ValueError:
        raise LogIntegrityError(f"{path}: not a record index (hex digests)") from None
    if len(data) % DIGEST_BYTES:
        raise LogIntegrityError(f"{path}: not a whole number of {DIGEST_BYTES}-byte digests")
    return frozenset(data[i : i + DIGEST_BYTES] for i in range(0, len(data), DIGEST_BYTES))


# -- opening a data set's ledger ----------------------------------------------------------------
def open_dataset_ledger(
    ledger_dir: Path,
    records: Sequence[Mapping[str, object]],
    max_bits: float,
    *,
    privacy: PrivacyLimit | None = None,
    legacy_id: str | None = None,
    read_only: bool = False,
) -> Ledger:
    """The lifetime ledger of the data set ``records`` are, with what overlapping ones spent.

    ``legacy_id`` is the data file's sha256, under which ledgers before version 2 were
    kept: if such a ledger exists it is adopted as a neighbour holding exactly these
    records (its spend carries over). ``read_only`` is the operator's audit: nothing is
    created, and a data set never seen reads as an empty ledger.
    """
    ledger_dir = Path(ledger_dir)
    if not read_only:
        try:
            ledger_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{ledger_dir}: cannot create ledger folder: {exc}") from exc
    key = holder_key(ledger_dir, create=not read_only)
    if key is None:  # read-only, and this folder never had a ledger keyed on records
        key = bytes(_KEY_HEX // 2)
    identity = identify(records, key)
    if legacy_id is not None and not read_only:
        _adopt_legacy(ledger_dir, legacy_id, identity)
    neighbours = _neighbours(ledger_dir, identity)
    inheritance = _inheritance(identity, neighbours)
    if not read_only:
        write_index(ledger_dir, identity.dataset_id, identity.digests)
    return Ledger.open(
        ledger_dir,
        identity.dataset_id,
        max_bits,
        privacy=privacy,
        read_only=read_only,
        inherited=inheritance,
    )


def _adopt_legacy(ledger_dir: Path, legacy_id: str, identity: DatasetIdentity) -> None:
    """A ledger named after the file's bytes (format 1) holds these very records."""
    if legacy_id == identity.dataset_id:
        return
    ledger = ledger_dir / f"{legacy_id}{LEDGER_SUFFIX}"
    index = ledger_dir / f"{legacy_id}{INDEX_SUFFIX}"
    if ledger.exists() and not index.exists():
        write_index(ledger_dir, legacy_id, identity.digests)


def _neighbours(ledger_dir: Path, identity: DatasetIdentity) -> list[_Neighbour]:
    """Every other ledger in the folder that shares a record, with its own spending."""
    found = []
    for index in sorted(ledger_dir.glob(f"*{INDEX_SUFFIX}")):
        other_id = index.name.removesuffix(INDEX_SUFFIX)
        if other_id == identity.dataset_id:
            continue
        digests = read_index(index)
        if digests.isdisjoint(identity.digests):
            continue
        with Ledger.open(ledger_dir, other_id, math.inf, read_only=True) as other:
            bits = sum(record.bits for record in other.records)
            curve = events_curve(record.dp for record in other.records if record.dp)
        found.append(_Neighbour(other_id, digests, bits, curve))
    return found


def _inheritance(identity: DatasetIdentity, neighbours: list[_Neighbour]) -> Inheritance | None:
    """The worst record's past: per record, the sum over the neighbours that hold it."""
    if not neighbours:
        return None
    signatures: dict[tuple[int, ...], int] = {}
    for digest in identity.digests:
        holders = tuple(i for i, n in enumerate(neighbours) if digest in n.digests)
        if holders:
            signatures[holders] = signatures.get(holders, 0) + 1
    bits = 0.0
    curve = np.zeros_like(neighbours[0].curve)
    for holders in signatures:
        bits = max(bits, sum(neighbours[i].bits for i in holders))
        curve = np.maximum(curve, sum((neighbours[i].curve for i in holders), np.zeros_like(curve)))
    sources = tuple((n.dataset_id, len(n.digests & identity.digests), n.bits) for n in neighbours)
    return Inheritance(bits=bits, curve=curve, sources=sources)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
