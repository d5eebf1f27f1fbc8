"""What coordinator and data holders say to each other, independent of the transport.

These dataclasses are the vocabulary of the protocol (DESIGN.md §4-5). The gRPC transport
(``common/wire.py``) and the Flower transport translate them to and from their own
records; the algorithms and the holder's policy only ever see these types.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from sottovoce.common.errors import RefusalCode
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.steplog import Step

MAX_TASK_ID_LENGTH = 64
MAX_HOLDER_ID_LENGTH = 64
MAX_LAMBDA = 64


class AnswerKind(StrEnum):
    """What a task asks for; each kind has a fixed information cost (see ``bits``)."""

    COMPARE = "compare"  # one candidate vs the incumbent: better or not (1 bit)
    BEST_OF = "best-of"  # index of the best of lambda candidates, or none: log2(lambda+1) bits
    DP_SCALAR = "dp-scalar"  # DPZero: clipped, averaged, noised finite difference (32 or k bits)


FLOAT32_BITS = 32
MAX_QUANTIZATION_BITS = 16


def answer_bits(kind: AnswerKind, n_candidates: int, quantization_bits: int = 0) -> float:
    """Information cost of one answer: log2 of the number of possible answers.

    A dp-scalar travels as a float32 (at most 32 bits of information), or as one of
    ``2**quantization_bits`` levels when quantized; either way it has a bit cost, so the
    bits-based generalization bound covers DPZero runs too.
    """
    if kind is AnswerKind.COMPARE:
        if n_candidates != 1:
            raise ValueError("a compare task has exactly one candidate")
        return 1.0
    if kind is AnswerKind.BEST_OF:
        return math.log2(n_candidates + 1)
    if kind is AnswerKind.DP_SCALAR:
        if n_candidates != 1:
            raise ValueError("a dp-scalar task has exactly one direction")
        return float(quantization_bits or FLOAT32_BITS)
    raise ValueError(f"unknown answer kind {kind}")


@dataclass(frozen=True)
class FitnessSpec:
    """The fitness a holder computes; pinned in its policy so the question cannot be crafted.

    ``kind = "classification"``: render ``prompt_template`` with the record's fields, score
    each of ``label_words`` as the next token; the record's ``label_field`` holds the index
    of the right label word. ``kind = "completion"``: mean log-likelihood of the record's
    ``target_field`` after the rendered prompt.
    """

    kind: Literal["classification", "completion"] = "classification"
    prompt_template: str = "Review: {text}\nSentiment:"
    label_words: tuple[str, ...] = (" negative", " positive")
    text_field: str = "text"
    label_field: str = "label"
    target_field: str = "answer"


@dataclass(frozen=True)
class BatchSpec:
    """Which examples a task is scored on.

    ``minibatch``: the holder draws ``batch_size`` examples with its own secret RNG (the
    coordinator never learns which); all candidates are scored on the same ones.
    ``full``: the holder's whole training split, as in the BBoxER paper.
    ``poisson``: every example joins independently with probability
    ``batch_size / n`` (the holder's secret RNG), so the batch has ``batch_size`` examples
    on average; the sampling DP accounting assumes (DPZero).
    """

    mode: Literal["minibatch", "full", "poisson"] = "minibatch"
    batch_size: int = 32


@dataclass(frozen=True)
class DpSpec:
    """The differential privacy a run asks of every holder's answers.

    DPZero (answer kind dp-scalar): each per-example finite difference is clipped to
    ``[-clip, clip]``, the clipped values of a Poisson batch are summed and divided by the
    expected batch size, and Gaussian noise of standard deviation
    ``noise_multiplier * clip / expected batch`` is added by the holder from its own secure
    entropy. ``noise_multiplier = 0`` is non-private DPZero (MeZO with clipping). With
    ``quantization_bits = k > 0`` the noisy value is clamped to
    ``[-quantization_range, quantization_range]`` and stochastically rounded to one of
    ``2**k`` levels, so an answer costs k bits.

    BBoxER: ``randomized_response_epsilon > 0`` makes every compare / best-of choice
    ε-DP by k-ary randomized response.

    ``epsilon`` and ``delta`` are the run's target (what the coordinator calibrated
    ``noise_multiplier`` for); every holder accounts at its own policy's delta and refuses
    a run whose noise its remaining budget cannot afford.
    """

    epsilon: float = 0.0
    delta: float = 0.0
    noise_multiplier: float = 0.0
    clip: float = 1.0
    quantization_bits: int = 0
    quantization_range: float = 1.0
    randomized_response_epsilon: float = 0.0

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0 or self.randomized_response_epsilon > 0


AnswerMechanism = Literal["plain", "randomized-response", "dp-scalar"]
"""How a holder turns its scores into what it releases; a policy names those it allows.

* ``plain``: the true compare / best-of choice. Bounded in bits, but not record-private:
  one record can decide a close comparison.
* ``randomized-response``: the choice under k-ary randomized response (epsilon-DP).
* ``dp-scalar``: DPZero's clipped, Poisson-subsampled, Gaussian-noised finite difference.
"""
ANSWER_MECHANISMS: tuple[AnswerMechanism, ...] = ("plain", "randomized-response", "dp-scalar")


def answer_mechanism(kind: AnswerKind, dp: DpSpec) -> AnswerMechanism:
    """The mechanism a run's answers use, from its answer kind and DP settings."""
    if kind is AnswerKind.DP_SCALAR:
        return "dp-scalar"
    return "randomized-response" if dp.randomized_response_epsilon > 0 else "plain"


@dataclass(frozen=True)
class RunSpec:
    """What a holder learns when it joins, and checks against its policy before answering."""

    run_id: str
    algorithm: str
    model_fingerprint: str
    parametrization: ParametrizationSpec
    fitness: FitnessSpec
    batch: BatchSpec
    answer_kind: AnswerKind
    bit_budget: float
    max_rounds: int
    log_genesis: str
    dp: DpSpec = DpSpec()
    direction_seed: int = 0  # seeds follow common.seeds.candidate_seed(direction_seed, ...)

    def answer_bits(self, n_candidates: int) -> float:
        """Bit cost of one answer in this run."""
        return answer_bits(self.answer_kind, n_candidates, self.dp.quantization_bits)

    @property
    def mechanism(self) -> AnswerMechanism:
        return answer_mechanism(self.answer_kind, self.dp)


@dataclass(frozen=True)
class Candidate:
    """The incumbent moved by ``scale * z(seed)`` in the parametrization's coordinates."""

    seed: int
    scale: float


@dataclass(frozen=True)
class Task:
    """One question for one holder.

    ``base_version`` is the log version the holder said it has; ``new_steps`` extend it to
    ``base_version + len(new_steps)``, whose head hash is ``log_head``.
    """

    task_id: str
    run_id: str
    round_index: int
    base_version: int
    new_steps: tuple[Step, ...]
    log_head: str
    candidates: tuple[Candidate, ...]
    answer_kind: AnswerKind
    batch: BatchSpec
    deadline_unix: float

    @property
    def target_version(self) -> int:
        return self.base_version + len(self.new_steps)


@dataclass(frozen=True)
class Answer:
    """A holder's reply to one task.

    For ``compare``: ``choice`` is 1 if the candidate is better, else 0. For ``best-of``:
    ``choice`` is 1 + the index of the best candidate, or 0 if none beats the incumbent.
    For ``dp-scalar``: ``value`` is the noised estimate, or, when quantized, ``choice`` is
    its level (see :func:`sottovoce.common.quantization.dequantize`).
    A refusal carries ``refusal``, a :class:`RefusalCode` and nothing else: the reason in
    words stays in the holder's own log. It costs nothing.
    """

    task_id: str
    choice: int | None
    refusal: RefusalCode | None = None
    value: float | None = None

    @property
    def refused(self) -> bool:
        return self.refusal is not None


@dataclass(frozen=True)
class JoinRequest:
    """What a holder declares when it joins: who it is and which model it holds."""

    holder_id: str
    model_fingerprint: str
    policy_summary: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunFinished:
    """Returned instead of a task once the run is over (budget spent or rounds done).

    Carries the steps the holder still lacks (from ``base_version``, the version it said
    it has), so it can bring its weights to the final model and compute its own local
    report (e.g. its train risk for the generalization bound) without telling anyone.
    """

    run_id: str
    reason: str
    final_version: int
    log_head: str
    bits_spent_total: float
    base_version: int = 0
    new_steps: tuple[Step, ...] = ()
