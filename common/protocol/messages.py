"""What coordinator and data holders say to each other, independent of the transport.

These dataclasses are the vocabulary of the protocol (docs/architecture.md). The gRPC transport
(``common/transport/wire.py``) and the Flower transport translate them to and from their own
records; the algorithms and the holder's policy only ever see these types.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from typing import Literal

from sottovoce.common.errors import RefusalCode
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.protocol.answers import (
    AnswerKind,
    AnswerMechanism,
    answer_bits,
    answer_mechanism,
)
from sottovoce.common.protocol.extractors import ANSWER_EXTRACTORS, ANSWER_MATCHES
from sottovoce.common.steplog import Step

FitnessKind = Literal["classification", "completion", "generation"]
MAX_NEW_TOKENS = 4096  # a generation fitness's longest pinned decode
BatchMode = Literal["minibatch", "full", "poisson"]


@dataclass(frozen=True)
class FitnessSpec:
    """The fitness a holder computes; pinned in its policy so the question cannot be crafted.

    ``kind = "classification"``: render ``prompt_template`` with the record's fields, score
    each of ``label_words`` as the next token; the record's ``label_field`` holds the index
    of the right label word. ``kind = "completion"``: mean log-likelihood of the record's
    ``target_field`` after the rendered prompt. ``kind = "generation"``: greedy decoding of
    at most ``max_new_tokens`` tokens after the prompt, the answer read from the decoded
    text and from the record's ``target_field`` by the named ``answer_extractor``, and
    compared by ``answer_match`` (score 1 if equal, else 0). The extractor is a name the
    holder's code knows (``common/protocol/extractors.py``), never a pattern the coordinator
    sends, and the holder pins every one of these fields.

    ``kl_weight`` > 0 adds a divergence penalty to choice and ranking answers (a ranking
    orders the penalized fitness, the same one a choice compares): a model's fitness is its
    mean score minus ``kl_weight`` times its mean KL(base || model), in nats, of the
    next-token distribution at the last position of ``kl_prompts`` of the holder's own
    prompts, a fixed subset only the holder knows (``client/divergence.py``). The score
    then also rewards staying a language model, which label-word scores alone never see.
    """

    kind: FitnessKind = "classification"
    prompt_template: str = "Review: {text}\nSentiment:"
    label_words: tuple[str, ...] = (" negative", " positive")
    text_field: str = "text"
    label_field: str = "label"
    target_field: str = "answer"
    max_new_tokens: int = 0  # generation only
    answer_extractor: str = ""  # generation only: e.g. "gsm8k" (the number after "#### ")
    answer_match: str = ""  # generation only: "exact" or "numeric"
    kl_weight: float = 0.0
    kl_prompts: int = 0

    @property
    def penalizes_divergence(self) -> bool:
        return self.kl_weight > 0

    @property
    def record_fields(self) -> list[str]:
        """Record fields the fitness reads: the template's placeholders, the label/target."""
        fields = template_fields(self.prompt_template)
        fields.append(self.label_field if self.kind == "classification" else self.target_field)
        return list(dict.fromkeys(fields))


def template_fields(template: str) -> list[str]:
    """The record fields a prompt template quotes; only plain ``{field_name}`` placeholders.

    ``{text.__class__}``, ``{text[3]}``, ``{text!r}`` or ``{text:>9}`` would let a template
    compute on the record instead of quoting it; pinning the template only means something
    if it can do nothing else. Raises ValueError naming the placeholder.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"prompt_template: not a valid format string ({exc})") from exc
    fields: list[str] = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(
                f"prompt_template: placeholder {{{name}}} must be a plain {{field_name}}"
            )
        if name not in fields:
            fields.append(name)
    return fields


def check_fitness_spec(spec: FitnessSpec) -> None:
    """What makes a fitness spec sound, beyond the wire's bounds (ValueError: ``field: why``)."""
    template_fields(spec.prompt_template)
    if spec.kind == "classification":
        words = spec.label_words
        if len(words) < 2 or len(set(words)) != len(words) or not all(words):
            raise ValueError("label_words: a classification needs >= 2 distinct, non-empty words")
    for name in ("text_field", "label_field", "target_field"):
        if not getattr(spec, name):
            raise ValueError(f"{name}: must not be empty")
    if spec.kind == "generation":
        if not 1 <= spec.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens: a generation needs 1..{MAX_NEW_TOKENS} tokens")
        if spec.answer_extractor not in ANSWER_EXTRACTORS:
            raise ValueError(
                f"answer_extractor: {spec.answer_extractor!r} is not one of "
                f"{sorted(ANSWER_EXTRACTORS)}"
            )
        if spec.answer_match not in ANSWER_MATCHES:
            raise ValueError("answer_match: must be 'exact' or 'numeric'")
    elif spec.max_new_tokens or spec.answer_extractor or spec.answer_match:
        raise ValueError("max_new_tokens, answer_extractor, answer_match: generation only")
    if not (math.isfinite(spec.kl_weight) and spec.kl_weight >= 0):
        raise ValueError(f"kl_weight: must be a finite number >= 0 (got {spec.kl_weight!r})")
    if spec.penalizes_divergence and spec.kl_prompts < 1:
        raise ValueError("kl_prompts: a divergence penalty (kl_weight > 0) needs >= 1 prompt")
    if not spec.penalizes_divergence and spec.kl_prompts:
        raise ValueError("kl_prompts: set only with a divergence penalty (kl_weight > 0)")


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

    mode: BatchMode = "minibatch"
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
    ε-DP by k-ary randomized response. Or, with ``chunks = K > 0``, every choice is a chunk
    vote: the holder splits its records into K secret chunks (a keyed hash of each record),
    each chunk votes for its best choice, and the holder releases the arg-max of the vote
    histogram with Gaussian noise of standard deviation ``vote_noise`` (in votes) on every
    count (GNMax); ``vote_noise = 0`` is non-private chunk voting. ``keep_margin``: after
    the noise, the winning candidate must lead every other count (keep's and every other
    candidate's) by more than this, else the answer is "keep the incumbent": post-processing
    of the noisy histogram, free in epsilon (with one candidate: ``keep_margin`` votes added
    to "keep").

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
    chunks: int = 0
    vote_noise: float = 0.0
    keep_margin: float = 0.0

    @property
    def private(self) -> bool:
        return (
            self.noise_multiplier > 0
            or self.randomized_response_epsilon > 0
            or (self.chunks > 0 and self.vote_noise > 0)
        )


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
    direction_seed: int = 0  # seeds follow protocol.seeds.candidate_seed(direction_seed, ...)
    rank_depth: int = 0  # ranking answers: how many candidates each names (0: all of them)

    def answer_bits(self, n_candidates: int) -> float:
        """Bit cost of one answer in this run."""
        return answer_bits(
            self.answer_kind,
            n_candidates,
            self.dp.quantization_bits,
            rank_depth=self.rank_depth,
        )

    @property
    def mechanism(self) -> AnswerMechanism:
        return answer_mechanism(
            self.answer_kind, self.dp.randomized_response_epsilon, self.dp.chunks
        )


@dataclass(frozen=True)
class Candidate:
    """The incumbent moved by ``scale * z(seed)`` in the parametrization's coordinates.

    An explicit candidate (CMA's samples) is the incumbent moved by ``delta`` (float32
    values in the parametrization's coordinate order) and has seed 0 and scale 1.
    """

    seed: int
    scale: float
    delta: tuple[float, ...] | None = None

    @classmethod
    def explicit(cls, delta: tuple[float, ...]) -> Candidate:
        return cls(seed=0, scale=1.0, delta=delta)

    @property
    def is_explicit(self) -> bool:
        return self.delta is not None


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
    its level (see :func:`sottovoce.common.quantization.dequantize`). For ``ranking``:
    ``ranking`` names the top candidates (0-based), best first.
    A refusal carries ``refusal``, a :class:`RefusalCode` and nothing else: the reason in
    words stays in the holder's own log. It costs nothing.
    """

    task_id: str
    choice: int | None
    refusal: RefusalCode | None = None
    value: float | None = None
    ranking: tuple[int, ...] | None = None

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
