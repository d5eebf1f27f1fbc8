"""Reading a holder's records, the bundled sentiment data, and fixed train/dev/test splits.

A record is a flat JSON-like dict. Holders keep theirs in ``.jsonl`` (one JSON object per
line) or ``.tsv`` (a header row, then tab-separated values; every value is a string).
Whatever is wrong with a file is reported as a :class:`DataError` naming the file, the line
and the field, so an operator can fix it without reading a traceback.

Splits (docs/architecture.md) are a deterministic shuffle with a fixed seed; data splitting is not
a privacy mechanism, so :class:`random.Random` is the right tool. The test split's hash
(:func:`records_hash`) is recorded so a report can say which examples it was measured on.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from sottovoce.common.errors import ConfigError, DataError
from sottovoce.common.storage import SHARED, atomic_write_text, canonical_json

Record = dict[str, object]

SENTIMENT_FILE = "movie_snippets.tsv"
# The bundled sentiment sets, all in the same format (id, mean rating, text): the movie
# snippets are the default task; the product reviews are an out-of-domain set.
SENTIMENT_SOURCES = {"movies": SENTIMENT_FILE, "amazon": "amazon_snippets.tsv"}
SENTIMENT_THRESHOLD = 0.5  # |mean rating| must exceed this (scale -4..4); the rest is neutral
SPLIT_SEED = 20261123
GSM8K_FIELDS = ("question", "answer")


def load_records(path: Path, required_fields: Sequence[str]) -> list[Record]:
    """Read ``.jsonl`` or ``.tsv`` records and check that each has ``required_fields``.

    Blank lines in a ``.jsonl`` file are skipped (a trailing newline is common); line numbers
    in errors are 1-based lines of the file.
    """
    return load_numbered_records(path, required_fields)[0]


def load_numbered_records(
    path: Path, required_fields: Sequence[str]
) -> tuple[list[Record], list[int]]:
    """:func:`load_records`, and each record's 1-based line in the file (for errors)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".tsv"):
        raise DataError(f"{path}: unknown extension {path.suffix!r}; use .jsonl or .tsv")
    lines = _read_lines(path)
    records = _parse_jsonl(path, lines) if suffix == ".jsonl" else _parse_tsv(path, lines)
    if not records:
        raise DataError(f"{path}: no records")
    for line_number, record in records:
        for name in required_fields:
            if name not in record:
                raise DataError(f"{path} line {line_number}: missing field {name!r}")
    return [record for _, record in records], [line_number for line_number, _ in records]


def _read_lines(path: Path) -> list[str]:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from err
    lines = raw.split(b"\n")
    decoded = []
    for index, line in enumerate(lines, start=1):
        try:
            decoded.append(line.decode("utf-8").removesuffix("\r"))
        except UnicodeDecodeError as err:
            raise DataError(f"{path} line {index}: not valid UTF-8 ({err.reason})") from err
    return decoded


def _parse_jsonl(path: Path, lines: list[str]) -> list[tuple[int, Record]]:
    records: list[tuple[int, Record]] = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {line_number}: invalid JSON ({err.msg})") from err
        if not isinstance(value, dict):
            raise DataError(f"{path} line {line_number}: not a JSON object")
        records.append((line_number, value))
    return records


def _parse_tsv(path: Path, lines: list[str]) -> list[tuple[int, Record]]:
    """A header row, then one record per line; no quoting (a tab never occurs in a value)."""
    while lines and not lines[-1]:
        lines = lines[:-1]
    if not lines:
        return []
    header = lines[0].split("\t")
    if len(set(header)) != len(header) or "" in header:
        raise DataError(f"{path} line 1: the header needs distinct, non-empty field names")
    records: list[tuple[int, Record]] = []
    for line_number, line in enumerate(lines[1:], start=2):
        values = line.split("\t")
        if len(values) != len(header):
            raise DataError(
                f"{path} line {line_number}: {len(values)} fields, the header has {len(header)}"
            )
        records.append((line_number, dict(zip(header, values, strict=True))))
    return records


def sentiment_records(source: str = "movies") -> list[Record]:
    """A bundled sentiment set as ``{"id", "text", "label"}`` records.

    Label 1 if the mean human rating is above 0.5, 0 if below -0.5; the neutral middle is
    dropped. ``"movies"`` (the default task) keeps 10,043 of its 10,605 sentences;
    ``"amazon"`` (product reviews, the out-of-domain set) keeps 2,943 of 3,707. See
    ``datasets/LICENSE-*.txt`` for sources and licenses.
    """
    if source not in SENTIMENT_SOURCES:
        raise ConfigError(
            f"unknown bundled sentiment set {source!r}; one of {', '.join(SENTIMENT_SOURCES)}"
        )
    name = SENTIMENT_SOURCES[source]
    text = (resources.files("sottovoce.common") / "datasets" / name).read_text(encoding="utf-8")
    records: list[Record] = []
    for line_number, line in enumerate(text.splitlines(), 1):
        fields = line.split("\t")
        if len(fields) != 3:
            raise DataError(f"{name} line {line_number}: expected id, score, text")
        ident, score_text, sentence = fields
        score = float(score_text)
        key: object = int(ident) if ident.isdigit() else ident
        if score > SENTIMENT_THRESHOLD:
            records.append({"id": key, "text": sentence, "label": 1})
        elif score < -SENTIMENT_THRESHOLD:
            records.append({"id": key, "text": sentence, "label": 0})
    return records


def gsm8k_records(path: Path) -> list[Record]:
    """GSM8K problems (``{"question", "answer"}`` per line, final answer after ``#### ``).

    Not bundled: the caller points at its own copy. Each record also gets ``id`` (its
    0-based position in the file) unless the file already has one.
    """
    records = load_records(path, GSM8K_FIELDS)
    for index, record in enumerate(records):
        for name in GSM8K_FIELDS:
            if not isinstance(record[name], str):
                raise DataError(f"{path} record {index + 1}: field {name!r} is not a string")
        record.setdefault("id", index)
    return records


@dataclass(frozen=True)
class SentimentSplits:
    """Disjoint train (what holders hold), dev (tuning) and test (reported once) splits."""

    train: list[Record]
    dev: list[Record]
    test: list[Record]

    def hashes(self) -> dict[str, str]:
        return {name: records_hash(getattr(self, name)) for name in ("train", "dev", "test")}


def split_records(
    records: Sequence[Record], *, test_size: int, dev_size: int, seed: int = SPLIT_SEED
) -> SentimentSplits:
    """Shuffle a copy with ``random.Random(seed)``; the first ``test_size`` are test, then dev."""
    if test_size < 0 or dev_size < 0:
        raise ConfigError(f"split sizes must be >= 0 (test {test_size}, dev {dev_size})")
    if test_size + dev_size >= len(records):
        raise ConfigError(
            f"cannot split {len(records)} records into test {test_size}, dev {dev_size} "
            "and a non-empty train split"
        )
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    return SentimentSplits(
        test=shuffled[:test_size],
        dev=shuffled[test_size : test_size + dev_size],
        train=shuffled[test_size + dev_size :],
    )


def split_sentiment(
    records: Sequence[Record],
    *,
    test_size: int = 1000,
    dev_size: int = 500,
    seed: int = SPLIT_SEED,
) -> SentimentSplits:
    """The project's fixed sentiment splits (defaults give 1,000 test, 500 dev, 8,543 train)."""
    return split_records(records, test_size=test_size, dev_size=dev_size, seed=seed)


def canonical_line(record: Record) -> str:
    """One record as canonical JSON: sorted keys, no spaces, UTF-8 kept as is."""
    return canonical_json(record, ensure_ascii=False)


def records_hash(records: Iterable[Record]) -> str:
    """``"sha256:<hex>"`` of the records as canonical JSON lines, in their order."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(canonical_line(record).encode("utf-8") + b"\n")
    return "sha256:" + digest.hexdigest()


def shard(records: Sequence[Record], n: int) -> list[list[Record]]:
    """Deal records round-robin to ``n`` holders (shard i gets records i, i+n, i+2n, ...)."""
    if n < 1:
        raise ConfigError(f"number of shards must be >= 1, got {n}")
    if n > len(records):
        raise ConfigError(f"cannot deal {len(records)} records to {n} holders: some get none")
    return [list(records[i::n]) for i in range(n)]


def write_jsonl(path: Path, records: Iterable[Record]) -> None:
    """Write records as canonical JSON lines, atomically: a reader sees the old or new file."""
    text = "".join(canonical_line(record) + "\n" for record in records)
    atomic_write_text(Path(path), text, mode=SHARED)
