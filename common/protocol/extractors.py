"""Answer extractors: how a generation fitness reads an answer from decoded text.

A generation fitness names one of these (``FitnessSpec.answer_extractor``) and the holder
pins the name; the coordinator never sends a pattern, so it cannot make the extractor
compute on the record (a regular expression chosen per question could test whether a
record contains a string). Each extractor reads the model's decoded continuation and the
record's target the same way, and returns None when it finds no answer (scored wrong).

* ``gsm8k``: the number after the last ``####`` (GSM8K's answer format), else None;
* ``last-number``: the last number in the text (for a model that does not write ``####``).

Matching (``answer_match``): ``exact`` compares the extracted strings after removing
thousands separators and surrounding space; ``numeric`` compares them as numbers
(``72.0`` equals ``72``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?"
_AFTER_HASHES = re.compile(rf"####\s*({_NUMBER})")
_ANY_NUMBER = re.compile(_NUMBER)


def _normalized(text: str) -> str:
    return text.replace(",", "").replace("$", "").replace(" ", "").strip().rstrip(".")


def gsm8k_answer(text: str) -> str | None:
    """The number after the last ``####``, thousands separators removed."""
    found = _AFTER_HASHES.findall(text)
    return _normalized(found[-1]) if found else None


def last_number(text: str) -> str | None:
    """The last number in ``text``."""
    found = _ANY_NUMBER.findall(text)
    return _normalized(found[-1]) if found else None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "gsm8k": gsm8k_answer,
    "last-number": last_number,
}
ANSWER_EXTRACTORS = frozenset(EXTRACTORS)
ANSWER_MATCHES = ("exact", "numeric")


def answers_match(predicted: str | None, target: str | None, match: str) -> bool:
    """Whether two extracted answers agree under ``match`` (no answer never matches)."""
    if predicted is None or target is None:
        return False
    if match == "exact":
        return predicted == target
    if match == "numeric":
        try:
            a, b = float(predicted), float(target)
        except ValueError:
            return False
        return math.isfinite(a) and math.isfinite(b) and math.isclose(a, b, rel_tol=0, abs_tol=1e-9)
    raise ValueError(f"unknown answer match {match!r}")
