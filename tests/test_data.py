"""Record files, the bundled sentiment data, fixed splits and sharding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sottovoce.common.data import (
    Record,
    gsm8k_records,
    load_records,
    records_hash,
    sentiment_records,
    shard,
    split_records,
    split_sentiment,
    write_jsonl,
)
from sottovoce.common.errors import ConfigError, DataError

# The fixed sentiment test split (1,000 records, seed 20261123); a change to the data, the
# labelling rule, the shuffle or the hash breaks this on purpose.
SENTIMENT_TEST_SPLIT_HASH = (
    "sha256:da1b4659f7b25f0e6d24c6ac65edbb65cc193a20f2726ebf884858e7f75e7a4d"
)
SENTIMENT_DEV_SPLIT_HASH = "sha256:332f7ed164e7f8554d24e3421acf882d5375e13b4a2a9b4e14b7b488658c5a67"


def test_load_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "holder.jsonl"
    path.write_text('{"text": "good", "label": 1}\n\n{"text": "bad", "label": 0, "x": [1]}\n')
    records = load_records(path, ["text", "label"])
    assert records == [{"text": "good", "label": 1}, {"text": "bad", "label": 0, "x": [1]}]


def test_load_tsv_with_header(tmp_path: Path) -> None:
    path = tmp_path / "holder.tsv"
    path.write_text("text\tlabel\nit's ''great''\t1\r\nmeh\t0\n")
    assert load_records(path, ["label"]) == [
        {"text": "it's ''great''", "label": "1"},
        {"text": "meh", "label": "0"},
    ]


def test_missing_field_names_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "holder.jsonl"
    lines = [json.dumps({"text": f"t{i}", "label": 0}) for i in range(11)]
    lines.append(json.dumps({"text": "no label"}))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        load_records(path, ["text", "label"])
    assert str(info.value) == f"{path} line 12: missing field 'label'"


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("a.jsonl", '{"text": 1}\n{"text": \n', "a.jsonl line 2: invalid JSON"),
        ("a.jsonl", '{"text": 1}\n[1, 2]\n', "a.jsonl line 2: not a JSON object"),
        ("a.jsonl", "\n\n", "a.jsonl: no records"),
        ("a.tsv", "", "a.tsv: no records"),
        ("a.tsv", "text\tlabel\n", "a.tsv: no records"),
        ("a.tsv", "text\tlabel\nx\t1\ny\n", "a.tsv line 3: 1 fields, the header has 2"),
        ("a.tsv", "text\ttext\nx\t1\n", "a.tsv line 1: the header needs distinct"),
        ("a.csv", "text,label\n", "a.csv: unknown extension '.csv'"),
    ],
)
def test_bad_files_are_data_errors(tmp_path: Path, name: str, content: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_records(path, ["text"])
    assert str(info.value).startswith(f"{tmp_path}/{expected}")


def test_invalid_utf8_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match="line 2: not valid UTF-8"):
        load_records(path, ["text"])
    with pytest.raises(DataError, match="cannot read"):
        load_records(tmp_path / "absent.jsonl", ["text"])


def test_sentiment_records_labels_and_count() -> None:
    records = sentiment_records()
    assert len(records) == 10_043
    assert sum(1 for r in records if r["label"] == 1) == 4_982
    assert records[0]["id"] == 1 and records[0]["label"] == 1
    assert str(records[0]["text"]).startswith("The Rock is destined")
    assert all(set(r) == {"id", "text", "label"} for r in records)
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids)


def test_sentiment_split_sizes_hash_and_determinism() -> None:
    records = sentiment_records()
    splits = split_sentiment(records)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (8_543, 500, 1_000)
    assert records_hash(splits.test) == SENTIMENT_TEST_SPLIT_HASH
    assert records_hash(splits.dev) == SENTIMENT_DEV_SPLIT_HASH
    again = split_sentiment(sentiment_records())
    assert again.hashes() == splits.hashes()
    ids = [r["id"] for part in (splits.train, splits.dev, splits.test) for r in part]
    assert sorted(ids) == sorted(r["id"] for r in records)  # disjoint and complete
    other = split_sentiment(records, seed=1)
    assert records_hash(other.test) != SENTIMENT_TEST_SPLIT_HASH


def test_split_rejects_impossible_sizes() -> None:
    records: list[Record] = [{"i": i} for i in range(10)]
    with pytest.raises(ConfigError):
        split_records(records, test_size=5, dev_size=5)
    with pytest.raises(ConfigError):
        split_records(records, test_size=-1, dev_size=0)
    splits = split_records(records, test_size=2, dev_size=3, seed=0)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (5, 3, 2)


def test_records_hash_is_canonical() -> None:
    a = records_hash([{"text": "é", "label": 1}])
    assert a == records_hash([{"label": 1, "text": "é"}])  # key order does not matter
    assert a != records_hash([{"text": "é", "label": 0}])
    assert records_hash([{"x": 1}, {"x": 2}]) != records_hash([{"x": 2}, {"x": 1}])
    # Known value: sha256 of the canonical line '{"label":1,"text":"é"}\n'.
    import hashlib

    expected = hashlib.sha256('{"label":1,"text":"é"}\n'.encode()).hexdigest()
    assert a == "sha256:" + expected


def test_shard_round_robin() -> None:
    records: list[Record] = [{"i": i} for i in range(7)]
    shards = shard(records, 3)
    assert [[r["i"] for r in s] for s in shards] == [[0, 3, 6], [1, 4], [2, 5]]
    assert shard(records, 1) == [records]
    with pytest.raises(ConfigError):
        shard(records, 0)
    with pytest.raises(ConfigError):
        shard(records, 8)


def test_write_jsonl_round_trips_atomically(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "train.jsonl"
    records: list[Record] = [{"text": "a\tb\n", "label": 1}, {"text": "ü", "label": 0}]
    write_jsonl(path, records)
    assert load_records(path, ["text", "label"]) == records
    assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]  # no temp file left
    write_jsonl(path, records[:1])
    assert load_records(path, ["text"]) == records[:1]


def test_gsm8k_records(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    rows = [{"question": "1+1?", "answer": "2\n#### 2"}, {"question": "2+2?", "answer": "#### 4"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = gsm8k_records(path)
    assert [r["id"] for r in records] == [0, 1]
    assert records[1]["answer"] == "#### 4"
    path.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match="line 1: missing field 'answer'"):
        gsm8k_records(path)
