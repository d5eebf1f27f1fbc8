"""The divergence penalty: the holder's own check that a candidate is still a language model.

A label-word fitness reads two logits of one position, so it cannot see a step that wrecks
everything else the model says (issue 11: perplexity 17 -> 1.5e9 at +6 points). With
``FitnessSpec.kl_weight`` > 0 every model a choice compares is scored as

    mean task score on the task's batch - kl_weight * mean KL(base || model)

where the KL is of the full next-token distribution at the last position of each of a
fixed, secret set of ``kl_prompts`` of the holder's own prompts. What this module keeps:

* **which prompts**: the records with the smallest keyed digests
  ``HMAC-SHA256(holder key, normalized record)`` (the key of ``client/dataset_identity.py``),
  so the set is the same in every run and after every restart, and only the holder knows it;
* **the base's answer on them**: the base model's last-position logits, computed once when
  the run is accepted (before any log step moves the weights) and kept for the run.

Nothing here leaves the holder: the penalty only changes which choice the holder makes,
and a choice costs the same bits (or the same epsilon under randomized response) whatever
was computed. It is pinned in the policy like the rest of the fitness, and allowed only with
the mechanisms in ``DIVERGENCE_PENALTY_MECHANISMS``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sottovoce.client.dataset_identity import normalized_record
from sottovoce.common.data import Record
from sottovoce.common.fitness import PreparedBatch
from sottovoce.common.quality import last_position_kl

if TYPE_CHECKING:
    from sottovoce.client.evaluator import Prefix

_SUBSET_LABEL = b"sottovoce-divergence-prompts-v1"


def secret_prompts(records: Sequence[Record], key: bytes, size: int) -> list[Record]:
    """The ``size`` records (all, if fewer) whose keyed digests are smallest, in that order.

    Keyed, so a coordinator that knows every record still cannot tell which are in the set;
    fixed by the key and the records, so it does not change between runs or restarts.
    """
    subkey = hmac.new(key, _SUBSET_LABEL, hashlib.sha256).digest()

    def digest(index: int) -> tuple[bytes, int]:
        mac = hmac.new(subkey, normalized_record(records[index]), hashlib.sha256).digest()
        return mac, index

    order = sorted(range(len(records)), key=digest)
    return [records[i] for i in order[: max(0, size)]]


@dataclass(frozen=True)
class DivergenceReference:
    """The secret prompts, ready to score, and the base model's last-position logits on them.

    ``prefixes[i]`` is batch i's cached prefix (the activations before the first block a
    run can move never change during it), or None where the evaluator runs a full forward;
    ``base_logits[i]`` is (rows, vocab) float32.
    """

    batches: tuple[PreparedBatch, ...]
    prefixes: tuple[Prefix | None, ...]
    base_logits: tuple[torch.Tensor, ...]

    @property
    def prompts(self) -> int:
        return sum(batch.size for batch in self.batches)

    def mean_kl(self, model_logits: Sequence[torch.Tensor]) -> float:
        """Mean KL(base || model) in nats over the prompts, given the model's logits per batch.

        float64 throughout, so the base itself gives exactly 0.0.
        """
        total = 0.0
        for base, logits in zip(self.base_logits, model_logits, strict=True):
            total += float(last_position_kl(base, logits).sum().item())
        return total / max(1, self.prompts)
