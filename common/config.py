"""The run config (``run.toml``): everything the coordinator needs to start or resume a run.

Parsed with ``tomllib`` and validated with pydantic, so a wrong type or an unknown key is
reported as one line naming the file and the field. The fitness and parametrization
sections become the :class:`RunSpec` every holder checks against its own policy.
"""

from __future__ import annotations

import difflib
import hashlib
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sottovoce.common.dtypes import DtypeName
from sottovoce.common.errors import AccountingError, ConfigError
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.protocol.answers import (
    ALGORITHM_ANSWER_KINDS,
    EXPLICIT_ALGORITHMS,
    Algorithm,
    AnswerKind,
)
from sottovoce.common.protocol.limits import (
    FINGERPRINT_REGEX,
    MAX_CHUNKS,
    MAX_EXPLICIT_DIMENSION,
    MAX_KEEP_MARGIN,
    MAX_QUANTIZATION_BITS,
    MAX_VOTE_NOISE,
)
from sottovoce.common.protocol.messages import BatchSpec, DpSpec, FitnessSpec, check_fitness_spec
from sottovoce.common.storage import canonical_json
from sottovoce.common.transport.wire import (
    WireError,
    check_batch,
    check_fitness,
    check_parametrization,
)

SERVICE_LIMIT_KEYS = (  # [server] keys outside the run's fingerprint (see RunConfig.fingerprint)
    "rate_limit_per_s",
    "rate_limit_burst",
    "join_rate_limit_per_s",
    "join_rate_limit_burst",
    "max_polls_per_holder",
    "max_workers",
    "max_missed_rounds",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunSection(_Section):
    """Identity and limits of the run."""

    name: str = Field(default="run", pattern=r"^[A-Za-z0-9._-]{1,24}$")
    algorithm: Algorithm = "bboxer-1+1"
    seed: int = Field(default=0, ge=0, lt=2**63)
    max_rounds: int = Field(default=100, ge=1, le=1_000_000)
    bit_budget: float = Field(default=300.0, gt=0)
    bound_delta: float = Field(default=0.05, gt=0, lt=1)


class ModelSection(_Section):
    """Which base model; holders load their own copy and must match its fingerprint."""

    name: str = "smollm2-135m-instruct"
    dtype: DtypeName = "float32"
    fingerprint: str | None = Field(default=None, pattern=rf"^{FINGERPRINT_REGEX}$")


class OptimizerSection(_Section):
    """The optimizer's population and step sizes.

    Comparison ES: ``initial_step`` adapted by the one-fifth rule within ``[min_step,
    max_step]``. Rank algorithms: ``initial_step`` is CMA's sigma0 and the (mu/mu_w,
    lambda)-ES's fixed sigma, ``max_step`` caps every candidate's move per coordinate
    (CMA's samples are clipped to it), and ``rank_depth`` is how many candidates each
    holder ranks (0: all ``candidates``; an answer costs log2(lambda!/(lambda-mu)!) bits).
    """

    initial_step: float = Field(default=0.05, gt=0)
    min_step: float = Field(default=1e-4, gt=0)
    max_step: float = Field(default=0.5, gt=0)
    candidates: int = Field(default=1, ge=1, le=64)
    mirrored: bool = False
    rank_depth: int = Field(default=0, ge=0, le=64)

    @model_validator(mode="after")
    def _steps_ordered(self) -> OptimizerSection:
        if not self.min_step <= self.initial_step <= self.max_step:
            raise ValueError("need min_step <= initial_step <= max_step")
        if self.mirrored and self.candidates % 2:
            raise ValueError("mirrored sampling needs an even number of candidates")
        return self


class DPZeroSection(_Section):
    """DPZero's step (Zhang et al., 2024): x <- x - learning_rate * g * z(seed), where g is
    the aggregate of the holders' clipped, noised finite differences along ±smoothing*z."""

    learning_rate: float = Field(default=1e-3, gt=0)
    smoothing: float = Field(default=1e-3, gt=0)
    clip: float = Field(default=1.0, gt=0)
    aggregate: Literal["mean", "median", "trimmed-mean"] = "mean"
    trim_fraction: float = Field(default=0.2, ge=0, lt=0.5)
    quantization_bits: int = Field(default=0, ge=0, le=MAX_QUANTIZATION_BITS)
    quantization_range: float | None = Field(default=None, gt=0)
    max_coefficient: float = Field(default=0.5, gt=0)


class PrivacySection(_Section):
    """Differential privacy of the answers (docs/architecture.md).

    DPZero: ``epsilon`` is the target over ``run.max_rounds`` steps at ``delta``; the noise
    multiplier is calibrated for the sampling rate ``evaluation.batch_size /
    examples_per_holder``. Leave ``epsilon`` out for non-private DPZero. BBoxER:
    ``randomized_response_epsilon`` makes each choice ε-DP; or ``chunks = K`` makes each
    choice the noisy arg-max of K secret chunks' votes, with ``vote_noise`` (the noise std
    on each vote count) given, or calibrated from ``epsilon`` over ``run.max_rounds``
    answers at ``delta``; neither: non-private chunk votes. ``keep_margin``: the lead over
    every other noisy count (keep's and every other candidate's) that a candidate needs to be
    released, else "keep the incumbent" (post-processing: free in ε), so that noise alone
    rarely accepts a candidate.
    """

    epsilon: float | None = Field(default=None, gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    examples_per_holder: int | None = Field(default=None, ge=1)
    randomized_response_epsilon: float | None = Field(default=None, gt=0)
    chunks: int | None = Field(default=None, ge=1, le=MAX_CHUNKS)
    vote_noise: float | None = Field(default=None, gt=0, le=MAX_VOTE_NOISE)
    keep_margin: float | None = Field(default=None, ge=0, le=MAX_KEEP_MARGIN)


class ServerSection(_Section):
    """How the coordinator listens and how rounds wait for holders."""

    address: str = "127.0.0.1:50051"
    min_holders: int = Field(default=1, ge=1)
    quorum: int = Field(default=1, ge=1)
    round_timeout_s: float = Field(default=300.0, gt=0)
    holder_weights: dict[str, float] = Field(default_factory=dict)
    # Holder ids (certificate common names under mutual TLS) allowed to join; empty: any
    # holder with a certificate from the federation's CA.
    allowed_holders: tuple[str, ...] = ()
    # Service limits (server/limits.py): they bound a flooding holder, never a well-behaved
    # one. Not in the run's fingerprint, so a restart may change them. The call limit
    # counts only a holder's calls that bring nothing new (a task or answer sent again, an
    # empty poll, a rejected call); a new task delivered or an answer accepted is free.
    rate_limit_per_s: float = Field(default=5.0, gt=0, le=1e6)
    rate_limit_burst: int = Field(default=50, ge=1, le=1_000_000)
    join_rate_limit_per_s: float = Field(default=1.0, gt=0, le=1e6)
    join_rate_limit_burst: int = Field(default=10, ge=1, le=1_000_000)
    max_polls_per_holder: int = Field(default=4, ge=1, le=1024)  # PullTasks waiting, streams open
    # A holder asked in this many rounds in a row that closed without its answer is
    # evicted (it may join again); a round then no longer waits for it. Left out of the
    # fingerprint like the limits: it says how the coordinator defends its rounds.
    max_missed_rounds: int = Field(default=3, ge=1, le=1_000_000)
    # Worker threads (one per waiting long-poll); default: 2 x max(min_holders,
    # len(allowed_holders)) + 16, at least 64.
    max_workers: int | None = Field(default=None, ge=4, le=100_000)

    @field_validator("holder_weights")
    @classmethod
    def _positive_weights(cls, weights: dict[str, float]) -> dict[str, float]:
        for holder, weight in weights.items():
            if weight <= 0:
                raise ValueError(f"weight of {holder!r} must be > 0")
        return weights


class SimulateSection(_Section):
    """Local federation on one machine (``sottovoce simulate``)."""

    holders: int = Field(default=3, ge=1, le=64)
    dataset: Literal["sentiment"] = "sentiment"
    test_size: int = Field(default=1000, ge=1)
    dev_size: int = Field(default=500, ge=0)
    train_size: int | None = Field(default=None, ge=1)
    threads_per_holder: int = Field(default=1, ge=1)
    eval_threads: int = Field(default=2, ge=1)
    eval_split: Literal["test", "dev"] = "test"
    # At most this many examples of each bundled out-of-domain set in the before/after
    # quality figures, a seeded sample (None: common.quality.OOD_CAP, 1000); what
    # `sottovoce evaluate --ood-cap` is for an evaluation.
    ood_cap: int | None = Field(default=None, ge=1)
    max_holder_policy_bits: float = Field(default=100_000.0, gt=0)
    # The simulated holders' drift caps: how far x (the parametrization's coordinates) may
    # move from the base in total, per coordinate and in L2 norm (None: no L2 cap).
    max_holder_drift_linf: float = Field(default=4.0, gt=0)
    max_holder_drift_l2: float | None = Field(default=None, gt=0)
    # The simulated holders' lifetime epsilon; default: exactly what this run needs.
    max_holder_policy_epsilon: float | None = Field(default=None, gt=0)


class RunConfig(_Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    # What the holders are asked: the protocol's own dataclasses, checked with the same
    # bounds as on the wire (one schema from run.toml to the holder's policy check).
    parametrization: ParametrizationSpec = ParametrizationSpec()
    optimizer: OptimizerSection = OptimizerSection()
    evaluation: BatchSpec = BatchSpec()
    dpzero: DPZeroSection = DPZeroSection()
    privacy: PrivacySection = PrivacySection()
    fitness: FitnessSpec = FitnessSpec()
    server: ServerSection = ServerSection()
    simulate: SimulateSection = SimulateSection()

    @field_validator("parametrization")
    @classmethod
    def _parametrization_bounds(cls, spec: ParametrizationSpec) -> ParametrizationSpec:
        _within_protocol(check_parametrization, spec)
        if spec.last_k_blocks is not None and spec.last_k_blocks < 1:
            raise ValueError(f"last_k_blocks: must be >= 1 (got {spec.last_k_blocks})")
        return spec

    @field_validator("evaluation")
    @classmethod
    def _batch_bounds(cls, spec: BatchSpec) -> BatchSpec:
        _within_protocol(check_batch, spec)
        return spec

    @field_validator("fitness")
    @classmethod
    def _fitness_bounds(cls, spec: FitnessSpec) -> FitnessSpec:
        _within_protocol(check_fitness, spec)
        check_fitness_spec(spec)
        return spec

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.run.algorithm == "bboxer-1+1" and self.optimizer.candidates != 1:
            raise ValueError("optimizer.candidates must be 1 for bboxer-1+1")
        if self.answer_kind is AnswerKind.RANKING:
            self._check_ranking()
        elif self.optimizer.rank_depth:
            raise ValueError("optimizer.rank_depth is for rank algorithms (cma-*, es-mu-lambda)")
        if self.server.quorum > self.server.min_holders:
            raise ValueError("server.quorum cannot exceed server.min_holders")
        if self.run.algorithm == "dpzero":
            if self.fitness.penalizes_divergence:
                raise ValueError(
                    "fitness.kl_weight: a divergence penalty is for choice answers; dpzero's "
                    "DP accounting does not cover a fixed set of prompts read every round"
                )
            self._check_dpzero()
        elif self.privacy.chunks is not None:
            self._check_chunk_votes()
        elif self.privacy.epsilon is not None:
            raise ValueError(
                "privacy.epsilon calibrates DPZero's or chunk votes' noise; for BBoxER set "
                "privacy.chunks too, or use privacy.randomized_response_epsilon"
            )
        elif self.privacy.vote_noise is not None or self.privacy.keep_margin is not None:
            raise ValueError(
                "privacy.vote_noise and privacy.keep_margin need privacy.chunks (the number "
                "of chunks)"
            )
        n = self.privacy.examples_per_holder
        if self.evaluation.mode == "poisson" and n is not None and self.evaluation.batch_size > n:
            raise ValueError(
                f"evaluation.batch_size {self.evaluation.batch_size} is larger than "
                f"privacy.examples_per_holder {n}: the expected batch must fit in the data"
            )
        return self

    def _check_ranking(self) -> None:
        opt = self.optimizer
        if opt.candidates < 2:
            raise ValueError(f"optimizer.candidates must be >= 2 for {self.run.algorithm}")
        if opt.rank_depth > opt.candidates:
            raise ValueError("optimizer.rank_depth cannot exceed optimizer.candidates")
        if self.privacy.randomized_response_epsilon is not None:
            raise ValueError("randomized response is not implemented for ranking answers")
        if self.privacy.chunks is not None:
            raise ValueError("privacy.chunks: chunk votes are not implemented for ranking answers")
        if self.run.algorithm in EXPLICIT_ALGORITHMS:
            if not 1 <= self.parametrization.dimension <= MAX_EXPLICIT_DIMENSION:
                raise ValueError(
                    f"parametrization.dimension: {self.run.algorithm} searches explicit "
                    f"coordinates; state their number (1..{MAX_EXPLICIT_DIMENSION})"
                )
            if opt.mirrored:
                raise ValueError("optimizer.mirrored: CMA samples its own candidates")

    def _check_dpzero(self) -> None:
        if self.evaluation.mode != "poisson":
            raise ValueError(
                f"evaluation.mode must be 'poisson' for dpzero (got {self.evaluation.mode!r}): "
                "the accountant assumes Poisson subsampling"
            )
        if self.privacy.randomized_response_epsilon is not None:
            raise ValueError("privacy.randomized_response_epsilon is for BBoxER, not dpzero")
        chunk_keys = (self.privacy.chunks, self.privacy.vote_noise, self.privacy.keep_margin)
        if any(value is not None for value in chunk_keys):
            raise ValueError(
                "privacy.chunks, vote_noise and keep_margin are for BBoxER, not dpzero"
            )
        if self.privacy.epsilon is None:
            return
        n = self.privacy.examples_per_holder
        if n is None:
            raise ValueError(
                "privacy.examples_per_holder is needed to calibrate the noise (sampling "
                "rate = evaluation.batch_size / examples_per_holder); set it to the smallest "
                "holder's number of training examples"
            )
        if self.privacy.delta >= 1.0 / n:
            raise ValueError(
                f"privacy.delta {self.privacy.delta:g} must be < 1/examples_per_holder = "
                f"{1.0 / n:.3g} (a delta of 1/n allows releasing one example outright)"
            )

    def _check_chunk_votes(self) -> None:
        privacy = self.privacy
        if self.evaluation.mode != "full":
            raise ValueError(
                f"evaluation.mode must be 'full' for chunk votes (got {self.evaluation.mode!r}): "
                "the chunks partition the holder's whole split"
            )
        if privacy.randomized_response_epsilon is not None:
            raise ValueError(
                "privacy.randomized_response_epsilon and privacy.chunks are two answer "
                "mechanisms; choose one"
            )
        if privacy.epsilon is not None and privacy.vote_noise is not None:
            raise ValueError(
                "privacy.vote_noise is calibrated from privacy.epsilon; set one of them"
            )
        if self.fitness.penalizes_divergence:
            raise ValueError(
                "fitness.kl_weight: a divergence penalty reads the same secret prompts in every "
                "chunk's score, so one of those records could move every chunk's vote, not one; "
                "chunk votes' sensitivity of sqrt(2) would not hold"
            )

    @property
    def answer_kind(self) -> AnswerKind:
        return ALGORITHM_ANSWER_KINDS[self.run.algorithm]

    @property
    def sampling_rate(self) -> float | None:
        """The Poisson rate the run is calibrated for (None without examples_per_holder)."""
        n = self.privacy.examples_per_holder
        return None if n is None else self.evaluation.batch_size / n

    def dp_spec(self) -> DpSpec:
        """What the run asks of holders' answers; calibrates DPZero's noise (once)."""
        privacy, dpzero = self.privacy, self.dpzero
        if self.run.algorithm != "dpzero" and privacy.chunks is not None:
            return self._chunk_vote_spec(privacy.chunks)
        if self.run.algorithm != "dpzero":
            return DpSpec(
                delta=privacy.delta if privacy.randomized_response_epsilon else 0.0,
                randomized_response_epsilon=privacy.randomized_response_epsilon or 0.0,
            )
        noise = 0.0
        if privacy.epsilon is not None:
            rate = self.sampling_rate
            assert rate is not None  # checked by _check_dpzero
            # dp_accounting (scipy) takes seconds to import: only when a run calibrates.
            from sottovoce.common.accounting import calibrate_noise_multiplier

            try:
                noise = calibrate_noise_multiplier(
                    privacy.epsilon, privacy.delta, self.run.max_rounds, rate
                )
            except AccountingError as exc:
                raise ConfigError(f"privacy.epsilon: {exc}") from None
        return DpSpec(
            epsilon=privacy.epsilon or 0.0,
            delta=privacy.delta if privacy.epsilon is not None else 0.0,
            noise_multiplier=noise,
            clip=dpzero.clip,
            quantization_bits=dpzero.quantization_bits,
            quantization_range=dpzero.quantization_range or dpzero.clip,
        )

    def _chunk_vote_spec(self, chunks: int) -> DpSpec:
        """Chunk votes: the vote noise as given, or calibrated for ``run.max_rounds`` answers."""
        # dp_accounting (scipy) takes seconds to import: only when a run calibrates.
        from sottovoce.common.accounting import (
            PrivacyAccountant,
            calibrate_vote_noise,
            chunk_vote_event,
        )

        privacy, rounds = self.privacy, self.run.max_rounds
        noise, margin = privacy.vote_noise or 0.0, privacy.keep_margin or 0.0
        if privacy.epsilon is not None:
            try:
                noise = calibrate_vote_noise(privacy.epsilon, privacy.delta, rounds)
            except AccountingError as exc:
                raise ConfigError(f"privacy.epsilon: {exc}") from None
        if noise <= 0:
            return DpSpec(chunks=chunks, keep_margin=margin)
        epsilon = privacy.epsilon
        if epsilon is None:
            epsilon = PrivacyAccountant([chunk_vote_event(noise)] * rounds).epsilon(privacy.delta)
        return DpSpec(
            epsilon=epsilon,
            delta=privacy.delta,
            chunks=chunks,
            vote_noise=noise,
            keep_margin=margin,
        )

    def fingerprint(self) -> str:
        """Hash of the parts that define the run (a resumed run must have the same).

        The service limits are left out: they say how the coordinator defends itself, not
        what the run is, and a run started before they existed keeps its fingerprint.
        """
        exclude: dict[str, Any] = {"simulate": True, "server": set(SERVICE_LIMIT_KEYS)}
        material = self.model_dump(mode="json", exclude=exclude)
        blob = canonical_json(material).encode()
        return hashlib.sha256(blob).hexdigest()


def _within_protocol(check: Callable[[str, Any], None], spec: object) -> None:
    """The wire's bounds on a spec, as a config error (pydantic names the section)."""
    try:
        check("", spec)
    except WireError as exc:
        raise ValueError(str(exc).removeprefix("invalid .")) from None


def parse_config(data: dict[str, Any], source: str) -> RunConfig:
    """Validate a config dict; errors name ``source`` and the dotted field."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc)}") from None


def load_config(path: Path) -> RunConfig:
    """Read and validate ``run.toml``."""
    return parse_config(read_toml(path), str(path))


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, turning every failure into one ConfigError line."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None


def describe_validation_error(exc: ValidationError) -> str:
    """First pydantic error as 'section.field: message' (one line).

    An unknown key gets the closest known one ("did you mean"); a check on a whole section
    (or the whole file) names it without quoting the section's every value.
    """
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        message = "unknown key" + _did_you_mean(first["loc"])
    elif (
        "input" in first
        and first["type"] not in ("missing",)
        and not isinstance(first["input"], dict | list)
    ):
        message = f"{message} (got {first['input']!r})"
    return f"{where}: {message}"


def _did_you_mean(loc: tuple[int | str, ...]) -> str:
    """'; did you mean "x"?' for the known key of that section closest to ``loc[-1]``."""
    model: Any = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return ""
    known = list(model.model_fields)
    if not known:
        return ""
    section = ".".join(str(part) for part in loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {(section + '.' if section else '') + close[0]!r}?"
    where = f"[{section}]" if section else "the top level"
    return f"; {where} has: {', '.join(known)}"
