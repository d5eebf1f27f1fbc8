"""Chunk votes (noisy arg-max over K secret chunks): their sensitivity, noise and accounting.

Each claim the ledger's epsilon rests on is measured here rather than restated: that one
record moves at most one vote (on built neighbouring data sets, with the tiny model's real
scores), that the noise on the histogram has the standard deviation the accountant was
told (from the released choices alone), and that the ledger's epsilon for a run equals
Opacus's RDP analysis fed with those two measurements. A planted mechanism that adds no
noise fails the same measurement.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import (
    FITNESS,
    make_policy,
    make_task,
    run_spec,
    scheduled_candidates,
    tiny_records,
)
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy.stats import norm

from sottovoce.client.dataset_identity import chunk_assignment, holder_key, open_dataset_ledger
from sottovoce.client.holder import DataHolder
from sottovoce.client.mechanisms import ChunkVote, chunk_votes
from sottovoce.client.private_answers import SecureRandomness, noisy_argmax
from sottovoce.common.accounting import (
    CHUNK_VOTE_SENSITIVITY,
    RDP_ORDERS,
    Gaussian,
    PrivacyAccountant,
    answer_epsilon,
    calibrate_vote_noise,
    chunk_vote_event,
    event_from_json,
)
from sottovoce.common.config import parse_config
from sottovoce.common.errors import ConfigError, PolicyViolation
from sottovoce.common.models import load_model
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.protocol.answers import AnswerKind
from sottovoce.common.protocol.messages import BatchSpec, Candidate, DpSpec, RunSpec, Task

DELTA = 1e-5
TRIALS = 6000  # released choices per noise measurement: sigma to about 2% (one standard error)
SCALES = ParametrizationSpec(kind="scale")


def chunk_spec(chunks: int, noise: float, **changes: Any) -> RunSpec:
    spec = run_spec(batch=BatchSpec(mode="full", batch_size=1))
    dp = DpSpec(epsilon=1.0, delta=DELTA, chunks=chunks, vote_noise=noise)
    return dataclasses.replace(spec, dp=dp, **changes)


FIXED_KEY = "5e" * 32  # a holder key of our own, so that the built examples are fixed


def holder_on(folder: Path, records: Sequence[dict[str, object]], **policy: Any) -> DataHolder:
    policy = {"max_bits": 1e6, "max_epsilon": 1e6, "delta": DELTA, **policy}
    holder_policy = make_policy(folder / "ledger", **policy)
    holder_policy.ledger_dir.mkdir(parents=True)
    (holder_policy.ledger_dir / "holder.key").write_text(FIXED_KEY + "\n", encoding="utf-8")
    ledger = open_dataset_ledger(
        holder_policy.ledger_dir,
        records,
        holder_policy.max_bits,
        privacy=holder_policy.privacy_limit(),
    )
    return DataHolder("h", records, holder_policy, ledger, lambda: load_model("tiny-llama"))


def untouched(holder: DataHolder) -> tuple[bytes, int]:
    return holder.ledger.path.read_bytes(), holder.forward_passes


class FixedScores:
    """An evaluator stand-in returning fixed per-example scores: the noise alone varies."""

    def __init__(self, incumbent: np.ndarray, candidates: Sequence[np.ndarray]):
        self.incumbent = incumbent
        self.candidates = list(candidates)

    def score(
        self, examples: Sequence[object], candidates: Sequence[Candidate]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        return self.incumbent, self.candidates


# -- one record moves at most one vote ---------------------------------------------------------
def test_one_record_added_or_removed_changes_at_most_one_vote(tmp_path: Path) -> None:
    """Neighbouring data sets built from real tiny-model scores: D and D plus one record.

    The other records keep their chunks (the hash is of the record alone), so only the new
    record's chunk can change its vote, and the histogram moves by at most sqrt(2). The
    example is not vacuous: some added records do flip their chunk's vote."""
    pool = tiny_records(60, seed=3)
    base, extra = pool[:40], pool[40:]
    holder = holder_on(tmp_path, base)
    spec = dataclasses.replace(
        chunk_spec(16, 1.0), algorithm="bboxer-1+lambda", answer_kind=AnswerKind.BEST_OF
    )
    holder.accept_run(spec)
    assert holder.evaluator is not None and holder.run is not None
    key = holder_key(holder.ledger.path.parent, create=False)
    assert key is not None
    candidates = scheduled_candidates(spec, 0, scales=(0.5, -0.5, 0.25))
    outcomes = len(candidates) + 1
    incumbent, scored = holder.evaluator.score(pool, candidates)

    def votes_of(indices: list[int]) -> np.ndarray:
        records = [pool[i] for i in indices]
        chunk_of = chunk_assignment(records, key, 16)
        return chunk_votes(incumbent[indices], [s[indices] for s in scored], chunk_of, 16)

    before = votes_of(list(range(40)))
    histogram = np.bincount(before, minlength=outcomes)
    shifts = []
    for index in range(40, 60):
        after = votes_of([*range(40), index])
        assert int((after != before).sum()) <= 1  # one chunk at most
        moved = np.bincount(after, minlength=outcomes) - histogram
        shifts.append(float(np.linalg.norm(moved)))
        removed = votes_of([i for i in range(40) if i != index - 40])
        assert int((removed != before).sum()) <= 1
    assert max(shifts) == pytest.approx(CHUNK_VOTE_SENSITIVITY)  # reached, never passed
    assert min(shifts) == 0.0 and len(extra) == 20


def test_chunks_are_a_keyed_hash_of_each_record_alone(tmp_path: Path) -> None:
    records = tiny_records(200, seed=4)
    key = holder_key(tmp_path, create=True)
    assert key is not None
    chunks = chunk_assignment(records, key, 8)
    assert set(chunks.tolist()) == set(range(8))
    # Another order, records added: every record keeps its chunk.
    grown = [*reversed(records), *tiny_records(10, seed=5)]
    again = chunk_assignment(grown, key, 8)
    assert again[:200].tolist() == chunks[::-1].tolist()
    # Without the key nobody can tell the partition: another key gives another one.
    other = chunk_assignment(records, bytes(32), 8)
    assert (other != chunks).mean() > 0.6


def test_chunk_votes_cost_no_more_forward_passes_than_a_plain_choice(tmp_path: Path) -> None:
    records = tiny_records(48, seed=6)
    passes = {}
    for name, dp in (("plain", DpSpec()), ("chunk-vote", chunk_spec(8, 2.0).dp)):
        holder = holder_on(tmp_path / name, records)
        spec = dataclasses.replace(chunk_spec(8, 2.0), dp=dp)
        holder.accept_run(spec)
        assert holder.run is not None and holder.run.mechanism.name == name
        holder.answer(make_task(spec, "t0"))
        passes[name] = holder.forward_passes
    assert passes["chunk-vote"] == passes["plain"] > 0


# -- the noise is what the accountant was told -------------------------------------------------
def measured_vote_noise(mechanism: ChunkVote, task: Task, trials: int) -> tuple[float, float]:
    """The noise std seen in released choices alone, and its standard error.

    Every record's candidate score beats the incumbent's, so every non-empty chunk votes
    for candidate 1: the counts differ by d = (votes for 1) - (votes to keep), and the
    noisy arg-max keeps the incumbent with probability Phi(-d / (sigma sqrt 2)). Inverting
    the observed rate gives sigma."""
    examples: list[dict[str, object]] = [{"text": f"r{i}", "label": i % 2} for i in range(60)]
    fixed = FixedScores(np.zeros(60), [np.ones(60)])
    counts = mechanism.histogram(
        mechanism.votes(fixed.incumbent, fixed.candidates, mechanism.assign(examples)), task
    )
    gap = counts[1] - counts[0]
    kept = sum(
        mechanism.release(fixed, examples, task).choice == 0  # type: ignore[arg-type]
        for _ in range(trials)
    )
    # A rate of 0 (no noise at all) reads as sigma 0, measured to within one trial's rate.
    rate = min(max(kept / trials, 0.5 / trials), 1 - 0.5 / trials)
    z = float(norm.ppf(rate))
    sigma = gap / (-z * math.sqrt(2)) if z < 0 else math.inf
    # Delta method: d sigma = sigma / |z| * dz, with dz = SE(rate) / phi(z).
    se_rate = math.sqrt(rate * (1 - rate) / trials)
    return sigma, sigma / abs(z) * se_rate / float(norm.pdf(z))


def vote_noise_matches(mechanism: ChunkVote, task: Task, trials: int = TRIALS) -> bool:
    event = mechanism.event(len(task.candidates), 1.0)
    assert isinstance(event, Gaussian)
    sigma, se = measured_vote_noise(mechanism, task, trials)
    return abs(sigma - event.noise_std) <= 4 * se


def a_chunk_vote(tmp_path: Path, mechanism: type[ChunkVote] = ChunkVote) -> tuple[ChunkVote, Task]:
    spec = chunk_spec(11, 8.0)
    key = holder_key(tmp_path, create=True)
    return mechanism(spec, SecureRandomness(), key), make_task(spec, "t")


def with_keep_margin(mechanism: ChunkVote, margin: float) -> ChunkVote:
    """The same holder's chunk vote (its key, fresh secure noise) with a keep margin."""
    dp = dataclasses.replace(mechanism.spec.dp, keep_margin=margin)
    spec = dataclasses.replace(mechanism.spec, dp=dp)
    return ChunkVote(spec, SecureRandomness(), mechanism.record_key)


def test_the_vote_noise_has_the_std_the_accountant_was_told(tmp_path: Path) -> None:
    mechanism, task = a_chunk_vote(tmp_path)
    event = mechanism.event(1, 1.0)
    assert event == Gaussian(8.0, math.sqrt(2)) and event.noise_multiplier == 8.0 / math.sqrt(2)
    sigma, se = measured_vote_noise(mechanism, task, TRIALS)
    assert se < 0.025 * 8.0  # precise enough to tell sigma from sigma / sqrt(2) or 0
    assert abs(sigma - 8.0) <= 4 * se


class Noiseless(ChunkVote):
    """Planted: the accountant is told sigma, the choice is the exact arg-max."""

    def noisy_choice(self, counts: np.ndarray) -> int:
        return int(np.argmax(counts))


class HalfNoise(ChunkVote):
    """Planted: noise std sigma / sqrt(2), the confusion of std with noise multiplier."""

    def noisy_choice(self, counts: np.ndarray) -> int:
        noisy = counts + np.array(
            [self.rng.gaussian(self.spec.dp.vote_noise / 2**0.5) for _ in counts]
        )
        return int(np.argmax(noisy))


@pytest.mark.parametrize("planted", [Noiseless, HalfNoise])
def test_a_planted_mechanism_with_less_noise_is_caught(
    tmp_path: Path, planted: type[ChunkVote]
) -> None:
    mechanism, task = a_chunk_vote(tmp_path, planted)
    assert not vote_noise_matches(mechanism, task)  # the honest one matches: the test above


def test_default_answer_is_the_noise_on_all_chunks_keeping(tmp_path: Path) -> None:
    mechanism, task = a_chunk_vote(tmp_path)
    # 11 chunks all keep, noise 8: keep wins with probability Phi(11 / (8 sqrt 2)) = 0.83.
    kept = sum(mechanism.default(task).choice == 0 for _ in range(2000)) / 2000
    assert kept == pytest.approx(float(norm.cdf(11 / (8 * math.sqrt(2)))), abs=0.03)


def test_the_keep_margin_is_post_processing(tmp_path: Path) -> None:
    """Votes added to "keep" after the noise: the same event, a higher bar for candidates."""
    mechanism, _ = a_chunk_vote(tmp_path)
    margined = with_keep_margin(mechanism, 8.0)
    assert margined.event(1, 1.0) == mechanism.event(1, 1.0)
    counts = np.array([0.0, 11.0])  # 11 chunks for the candidate, noise 8, margin 8
    kept = sum(margined.noisy_choice(counts) == 0 for _ in range(2000)) / 2000
    assert kept == pytest.approx(float(norm.cdf((8 - 11) / (8 * math.sqrt(2)))), abs=0.03)


@pytest.mark.parametrize(
    ("counts", "lead", "choice"),
    [
        ([0.0, 10.0, 9.0], 0.0, 1),  # no margin: the plain arg-max
        ([0.0, 10.0, 9.0], 0.5, 1),  # leads the runner-up candidate by 1 > 0.5
        ([0.0, 10.0, 9.0], 2.0, 0),  # ... but not by 2: keep, though far above keep's 0
        ([3.0, 10.0, 0.0], 7.0, 0),  # a lead of exactly 7 over keep is not more than 7
        ([3.0, 10.0, 0.0], 6.9, 1),
        ([0.0, 5.0, 5.0], 0.0, 1),  # tie without a margin: the lowest index
        ([0.0, 5.0, 5.0], 0.1, 0),  # tie with one: no candidate leads
        ([9.0, 1.0], 0.0, 0),
    ],
)
def test_the_keep_margin_is_a_lead_over_every_other_count(
    counts: list[float], lead: float, choice: int
) -> None:
    """Without noise the rule is exact: the winner must beat keep and every other candidate."""
    assert noisy_argmax(counts, 0.0, SecureRandomness(), lead=lead) == choice


def test_with_mirrored_votes_the_margin_still_filters(tmp_path: Path) -> None:
    """A +z / -z pair that splits the chunks evenly (no chunk keeps): noise alone must not
    decide the step. Released iff |n1 - n2| > margin (keep, at -20 votes, never wins):
    probability 2 Phi(-margin / (sigma sqrt 2)) = 0.48 at margin = sigma = 8; a margin over
    keep alone would release a candidate every time."""
    mechanism, _ = a_chunk_vote(tmp_path)
    margined = with_keep_margin(mechanism, 8.0)
    counts = np.array([-20.0, 20.0, 20.0])
    released = sum(margined.noisy_choice(counts) != 0 for _ in range(2000)) / 2000
    assert released == pytest.approx(2 * float(norm.cdf(-8 / (8 * math.sqrt(2)))), abs=0.035)


# -- the accountant against Opacus, fed from measurements -------------------------------------
def test_ledger_epsilon_equals_opacus_from_measured_noise_and_sensitivity(tmp_path: Path) -> None:
    """A run of chunk-vote answers charged by the real holder; Opacus gets the noise std
    measured from the holder's own mechanism and the sensitivity measured on neighbouring
    data sets, not the constants the code uses, so a wrong sqrt(2) cannot pass both."""
    records = tiny_records(40, seed=7)
    holder = holder_on(tmp_path / "h", records)
    spec = chunk_spec(11, 8.0)
    holder.accept_run(spec)
    answers = 12
    for number in range(answers):
        task = make_task(spec, f"t{number}", round_index=number)
        assert holder.answer(task).choice in (0, 1)
    ledger_epsilon = holder.ledger.spent_epsilon(DELTA)

    assert holder.run is not None and isinstance(holder.run.mechanism, ChunkVote)
    sigma, se = measured_vote_noise(holder.run.mechanism, make_task(spec, "probe"), TRIALS)
    sensitivity = measured_sensitivity(holder, spec)
    rdp = compute_rdp(
        q=1.0, noise_multiplier=sigma / sensitivity, steps=answers, orders=list(RDP_ORDERS)
    )
    opacus_epsilon, _ = get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=DELTA)
    # epsilon is about inversely proportional to sigma here: 4 standard errors of sigma.
    assert ledger_epsilon == pytest.approx(float(opacus_epsilon), rel=4 * se / sigma + 1e-3)
    assert sensitivity == pytest.approx(math.sqrt(2))


def measured_sensitivity(holder: DataHolder, spec: RunSpec) -> float:
    """The largest L2 change of the vote histogram over records added to the holder's data."""
    assert holder.evaluator is not None
    key = holder_key(holder.ledger.path.parent, create=False)
    assert key is not None
    chunks = spec.dp.chunks
    base = holder.records
    extra = tiny_records(30, seed=8)
    largest = 0.0
    for round_index in range(3):
        candidates = scheduled_candidates(spec, round_index, scales=(0.5,))
        incumbent, (scored,) = holder.evaluator.score([*base, *extra], candidates)
        everything = [*base, *extra]
        chunk_of = chunk_assignment(everything, key, chunks)
        n = len(base)
        before = np.bincount(
            chunk_votes(incumbent[:n], [scored[:n]], chunk_of[:n], chunks), minlength=2
        )
        for index in range(n, len(everything)):
            keep = [*range(n), index]
            after = np.bincount(
                chunk_votes(incumbent[keep], [scored[keep]], chunk_of[keep], chunks), minlength=2
            )
            largest = max(largest, float(np.linalg.norm(after - before)))
    return largest


def test_calibrated_vote_noise_meets_the_target_and_round_trips() -> None:
    noise = calibrate_vote_noise(6.0, DELTA, 150)
    at = PrivacyAccountant([chunk_vote_event(noise)] * 150).epsilon(DELTA)
    below = PrivacyAccountant([chunk_vote_event(noise * 0.99)] * 150).epsilon(DELTA)
    assert at <= 6.0 < below and at == pytest.approx(6.0, rel=1e-3)
    assert event_from_json(chunk_vote_event(noise).to_json()) == chunk_vote_event(noise)
    assert answer_epsilon(chunk_vote_event(noise), DELTA) < 0.5


# -- the policy pins the mechanism -------------------------------------------------------------
REQUIRES_CHUNK_VOTES = {"answer_mechanisms": ["chunk-vote"], "require_dp": True, "min_chunks": 8}


@pytest.mark.parametrize(
    ("dp", "batch", "message"),
    [
        (DpSpec(), None, "policy requires DP answers"),
        (
            DpSpec(delta=DELTA, randomized_response_epsilon=1.0),
            None,
            "policy allows ['chunk-vote']",
        ),
        (DpSpec(chunks=16), None, "no randomized response and no noisy chunk votes"),
        (DpSpec(delta=DELTA, chunks=4, vote_noise=8.0), None, "min_chunks 8"),
        (
            DpSpec(delta=DELTA, chunks=16, vote_noise=8.0),
            BatchSpec(mode="minibatch", batch_size=16),
            "batch mode 'full'",
        ),
        (
            DpSpec(delta=DELTA, chunks=16, vote_noise=8.0, randomized_response_epsilon=1.0),
            None,
            "mixes randomized response into chunk votes",
        ),
        (DpSpec(delta=DELTA, chunks=16, vote_noise=1.0), None, "max_answer_epsilon 1"),
    ],
    ids=["plain", "randomized response", "noiseless", "few chunks", "minibatch", "mixed", "loud"],
)
def test_a_policy_requiring_chunk_votes_refuses_other_runs_with_nothing_charged(
    tmp_path: Path, dp: DpSpec, batch: BatchSpec | None, message: str
) -> None:
    holder = holder_on(tmp_path, tiny_records(32), max_answer_epsilon=1.0, **REQUIRES_CHUNK_VOTES)
    spec = dataclasses.replace(chunk_spec(16, 8.0), dp=dp)
    if batch is not None:
        spec = dataclasses.replace(spec, batch=batch)
    with pytest.raises(PolicyViolation, match=re.escape(message)):
        holder.accept_run(spec)
    assert untouched(holder) == (b"", 0) and holder.spec is None
    holder.accept_run(chunk_spec(16, 8.0))  # what it does allow
    assert not holder.answer(make_task(chunk_spec(16, 8.0), "t")).refused


def test_the_run_config_calibrates_chunk_votes_and_refuses_nonsense() -> None:
    base: dict[str, Any] = {
        "run": {"algorithm": "bboxer-1+lambda", "max_rounds": 50},
        "optimizer": {"candidates": 7},
        "evaluation": {"mode": "full"},
    }
    config = parse_config({**base, "privacy": {"chunks": 64, "epsilon": 6.0}}, "t")
    dp = config.dp_spec()
    assert dp.chunks == 64 and dp.vote_noise == pytest.approx(calibrate_vote_noise(6.0, DELTA, 50))
    stated = parse_config({**base, "privacy": {"chunks": 64, "vote_noise": 8.0}}, "t").dp_spec()
    assert stated.vote_noise == 8.0 and stated.epsilon == pytest.approx(
        PrivacyAccountant([chunk_vote_event(8.0)] * 50).epsilon(DELTA)
    )
    for privacy, evaluation, message in [
        ({"chunks": 64, "epsilon": 6.0, "vote_noise": 8.0}, "full", "set one of them"),
        ({"chunks": 64, "randomized_response_epsilon": 1.0}, "full", "choose one"),
        ({"chunks": 64, "epsilon": 6.0}, "minibatch", "must be 'full' for chunk votes"),
        ({"vote_noise": 8.0}, "full", "need privacy.chunks"),
    ]:
        data = {**base, "evaluation": {"mode": evaluation}, "privacy": privacy}
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config(data, "t")


# -- no divergence penalty -------------------------------------------------------------------
PENALTY = {"kl_weight": 1.0, "kl_prompts": 8}


def test_chunk_votes_refuse_a_divergence_penalty(tmp_path: Path) -> None:
    """The penalty's secret prompts enter every chunk's score, so one of those records could
    move every vote: the run config, the policy and the holder each refuse the pair."""
    base: dict[str, Any] = {
        "run": {"algorithm": "bboxer-1+lambda", "max_rounds": 50},
        "optimizer": {"candidates": 7},
        "evaluation": {"mode": "full"},
        "privacy": {"chunks": 64, "epsilon": 6.0},
    }
    assert parse_config(base, "t").dp_spec().chunks == 64
    with pytest.raises(ConfigError, match=r"fitness.kl_weight: .*every chunk's score"):
        parse_config({**base, "fitness": PENALTY}, "t")
    with pytest.raises(ValueError, match=r"fitness.kl_weight: .*'chunk-vote'"):
        make_policy(
            tmp_path / "a",
            fitness=PENALTY,
            max_epsilon=6.0,
            delta=DELTA,
            **REQUIRES_CHUNK_VOTES,
        )
    # A policy that pins the penalty allows only choices that can carry it; a chunk-vote run
    # with that fitness is refused before anything is read or charged.
    holder = holder_on(
        tmp_path / "b",
        tiny_records(32),
        fitness=PENALTY,
        answer_mechanisms=["plain", "randomized-response"],
    )
    penalized = dataclasses.replace(FITNESS, kl_weight=1.0, kl_prompts=8)
    spec = chunk_spec(16, 8.0, fitness=penalized)
    with pytest.raises(PolicyViolation, match="'chunk-vote' answers cannot carry"):
        holder.accept_run(spec)
    assert untouched(holder) == (b"", 0) and holder.spec is None
