"""The CMA family and the (mu/mu_w, lambda)-ES: told ranks only, explicit steps, exact replay."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import cma
import numpy as np
import pytest
import torch
from helpers import TINY, run_config_data, tiny_records

from sottovoce.common.config import RunConfig, parse_config
from sottovoce.common.data import shard
from sottovoce.common.errors import ConfigError, RequestRefused
from sottovoce.common.models import load_model
from sottovoce.common.protocol.answers import encode_ranking
from sottovoce.common.protocol.messages import Answer, Task
from sottovoce.common.steplog import Step
from sottovoce.local import drive_locally, open_local_holders
from sottovoce.server.coordinator import Coordinator
from sottovoce.server.export import replay
from sottovoce.server.run_state import RunState
from sottovoce.server.strategies import CMAStrategy, RoundAnswers, WeightedES
from sottovoce.server.strategies.ranks import aggregate_choices, derived_losses

NORM = {"kind": "scale", "patterns": ["model.norm.weight"], "dimension": 32}


def _cma(depth: int = 0, diagonal: bool = False, seed: int = 3) -> CMAStrategy:
    return CMAStrategy(
        dimension=6,
        candidates=6,
        sigma=0.1,
        rank_depth=depth,
        max_scale=0.5,
        diagonal=diagonal,
        seed=seed,
    )


def _choices(strategy: CMAStrategy, rng: np.random.Generator, holders: int = 3) -> dict[str, int]:
    n, depth = strategy.candidates, strategy.rank_depth
    return {
        f"h{i}": encode_ranking(tuple(rng.permutation(n)[: depth or n]), n, depth)
        for i in range(holders)
    }


@pytest.mark.parametrize(("depth", "diagonal"), [(0, False), (2, False), (3, True)])
def test_the_library_is_told_only_what_the_ranks_say(
    depth: int, diagonal: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pycma's tell receives exactly the losses derived from the aggregated ranking."""
    strategy = _cma(depth, diagonal)
    told: list[list[float]] = []
    original = strategy.es.tell

    def spy(solutions: Any, values: Any, *args: Any, **kwargs: Any) -> Any:
        told.append([float(v) for v in values])
        return original(solutions, values, *args, **kwargs)

    monkeypatch.setattr(strategy.es, "tell", spy)
    rng = np.random.default_rng(0)
    for round_index in range(4):
        candidates = strategy.ask(round_index)
        choices = _choices(strategy, rng)
        outcome = strategy.tell(RoundAnswers(candidates, choices))
        ranking = aggregate_choices(choices, 6, depth)
        assert outcome.ranking == ranking
        assert told[-1] == derived_losses(ranking, 6)  # nothing but a function of the ranks
    assert len(told) == 4


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_with_top_mu_the_order_among_the_unnamed_is_never_read(depth: int) -> None:
    """Two pycmas told the same top mu, the rest tied or in any strict order, stay identical:
    mean, covariance and step size. So tied derived losses cannot inflate sigma either."""
    a, b = _cma(depth=depth), _cma(depth=depth)
    tied = [float(p) for p in range(depth)] + [float(depth)] * (6 - depth)
    strict = [float(p) for p in range(depth)] + [depth + 0.5 * k for k in (3, 1, 2, 0, 4)][
        : 6 - depth
    ]
    for round_index in range(6):
        ca, cb = a.ask(round_index), b.ask(round_index)
        assert ca == cb
        a.es.tell(a._told_for(ca), tied)
        b.es.tell(b._told_for(cb), strict)
        a._asked, b._asked = {}, {}
        assert np.array_equal(a.es.mean, b.es.mean)
        assert a.es.sigma == b.es.sigma
        assert np.array_equal(a.es.sm.C, b.es.sm.C)


def test_pycma_defaults_would_read_the_tie() -> None:
    """Why active CMA is off and CMA_mu is set: with the defaults, the unnamed order matters."""
    a = cma.CMAEvolutionStrategy(np.zeros(6), 0.1, {"seed": 5, "verbose": -9, "popsize": 6})
    b = cma.CMAEvolutionStrategy(np.zeros(6), 0.1, {"seed": 5, "verbose": -9, "popsize": 6})
    xa, xb = a.ask(), b.ask()
    a.tell(xa, [0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    b.tell(xb, [0.0, 1.0, 1.4, 1.2, 1.3, 1.1])
    assert (
        not np.array_equal(a.sm.C, b.sm.C)
        or a.sigma != b.sigma
        or not np.array_equal(a.mean, b.mean)
    )


def test_clipped_candidates_stay_within_the_holders_cap_after_float32_rounding() -> None:
    strategy = CMAStrategy(
        dimension=6, candidates=6, sigma=1.0, rank_depth=0, max_scale=0.05, diagonal=False, seed=1
    )
    deltas = [v for c in strategy.ask(0) for v in c.delta or ()]
    assert max(abs(v) for v in deltas) <= 0.05  # 0.05 itself rounds up to 0.0500000007
    assert any(abs(v) == strategy.max_scale for v in deltas)  # sigma 1: many are clipped


def test_explicit_steps_keep_the_log_and_pycma_together() -> None:
    strategy = _cma()
    rng = np.random.default_rng(2)
    x = np.zeros(6, dtype=np.float32)
    for round_index in range(3):
        outcome = strategy.tell(RoundAnswers(strategy.ask(round_index), _choices(strategy, rng)))
        assert len(outcome.steps) == 1 and outcome.steps[0].delta is not None
        x = x + np.asarray(outcome.steps[0].delta, dtype=np.float32)  # the canonical replay
        assert np.array_equal(strategy.position, x)
        assert np.array_equal(strategy.es.mean, x.astype(np.float64))


def test_cma_needs_the_stated_dimension() -> None:
    with pytest.raises(ConfigError, match="dimension"):
        parse_config(
            run_config_data(
                run={"algorithm": "cma-es"},
                parametrization={"kind": "scale", "patterns": ["model.norm.weight"]},
                optimizer={"candidates": 4},
            ),
            "t",
        )


def _config(algorithm: str, parametrization: dict[str, Any], **optimizer: Any) -> RunConfig:
    return parse_config(
        run_config_data(
            run={
                "name": "t",
                "seed": 7,
                "max_rounds": 4,
                "bit_budget": 1e4,
                "algorithm": algorithm,
            },
            parametrization=parametrization,
            optimizer={"initial_step": 0.05, "min_step": 0.001, "max_step": 0.2, **optimizer},
            server={"min_holders": 3, "quorum": 3, "round_timeout_s": 60.0},
        ),
        "t",
    )


@pytest.mark.parametrize(
    ("algorithm", "parametrization", "optimizer"),
    [
        ("cma-es", NORM, {"candidates": 4}),
        ("cma-diagonal", NORM, {"candidates": 4, "rank_depth": 2}),
        ("es-mu-lambda", {"kind": "lowrank", "rank": 1, "last_k_blocks": 1}, {"candidates": 4}),
    ],
)
def test_a_rank_run_exports_what_holders_hold_and_resumes_exactly(
    algorithm: str, parametrization: dict[str, Any], optimizer: dict[str, Any]
) -> None:
    config = _config(algorithm, parametrization, **optimizer)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = load_model(TINY)
        holders = open_local_holders(config, base.fingerprint, shard(tiny_records(48), 3), root)
        state = RunState.open(root / "run", config, "t", base.fingerprint)
        coordinator = Coordinator(config, state, base.fingerprint)
        drive_locally(coordinator, holders)
        assert all(h.status.refused == 0 and h.status.defaulted == 0 for h in holders)
        assert state.log.version >= 1
        per_answer = {"cma-es": np.log2(24), "cma-diagonal": np.log2(12)}.get(algorithm)
        if per_answer is not None:
            assert state.bits_total == pytest.approx(3 * 4 * per_answer)
        exported = replay(load_model(TINY), config, state.log)
        held = holders[0].evaluator
        assert held is not None
        own = held.parametrization.export_state_dict()
        assert all(torch.equal(exported[k], own[k]) for k in exported)
        resumed = Coordinator(config, RunState.open(root / "run", config, "t", base.fingerprint),
                              base.fingerprint)  # fmt: skip
        assert resumed.strategy.step_size == coordinator.strategy.step_size
        if isinstance(coordinator.strategy, CMAStrategy):
            assert isinstance(resumed.strategy, CMAStrategy)
            assert np.array_equal(resumed.strategy.es.mean, coordinator.strategy.es.mean)
            assert resumed.strategy.ask(4) == coordinator.strategy.ask(4)


def test_the_weighted_es_logs_one_seeded_step_per_selected_seed() -> None:
    strategy = WeightedES(run_seed=1, candidates=8, sigma=0.125, rank_depth=0, mirrored=True)
    candidates = strategy.ask(0)
    # both signs of seed 0 ranked first: their weights cancel into one step
    choices = {"h": encode_ranking((0, 1, 2, 4, 3, 5, 6, 7), 8)}
    outcome = strategy.tell(RoundAnswers(candidates, choices))
    # the top 4 are both signs of pair 0 (their weights partly cancel), then pairs 1 and 2
    assert [s.seed for s in outcome.steps] == [candidates[i].seed for i in (0, 2, 4)]
    w = strategy.recombination
    assert outcome.steps[0].coefficient == pytest.approx(0.125 * (w[0] - w[1]), rel=1e-6)
    assert all(isinstance(s, Step) and s.delta is None for s in outcome.steps)
    assert sum(abs(s.coefficient) for s in outcome.steps) <= 0.125


def test_the_coordinator_refuses_rankings_of_the_wrong_shape(tmp_path: Path) -> None:
    config = _config("cma-es", NORM, candidates=4, rank_depth=2)
    base = load_model(TINY)
    state = RunState.open(tmp_path / "run", config, "t", base.fingerprint)
    coordinator = Coordinator(config, state, base.fingerprint)
    holders = open_local_holders(config, base.fingerprint, shard(tiny_records(48), 3), tmp_path)
    for holder in holders:
        holder.accept_run(coordinator.join(holder.join_request()))
    first = holders[0]
    task = coordinator.pull_task(first.holder_id, 0, first.log_head, timeout_s=0.0)
    assert isinstance(task, Task) and all(c.delta is not None for c in task.candidates)
    for bad in [
        Answer(task_id=task.task_id, choice=None, ranking=(0, 1, 2)),  # depth is 2
        Answer(task_id=task.task_id, choice=None, ranking=(0, 4)),  # only 4 candidates
        Answer(task_id=task.task_id, choice=1),  # a choice, not a ranking
    ]:
        with pytest.raises(RequestRefused):
            coordinator.push_answer(first.holder_id, bad)
    answer = first.answer(task)
    assert answer.ranking is not None
    assert coordinator.push_answer(first.holder_id, answer)
    assert state.bits_total == pytest.approx(np.log2(12))  # log2(4 * 3): one answer heard


@pytest.mark.parametrize("diagonal", [False, True])
def test_an_unanswered_round_is_asked_again_and_sigma_is_csa_at_any_dimension(
    diagonal: bool,
) -> None:
    """576 coordinates (the final norm) would get pycma's TPA, whose next ask fails after
    an ask nobody told; here CSA is set and the untold samples are the next round's."""
    strategy = CMAStrategy(
        dimension=576, candidates=8, sigma=0.002, rank_depth=0, max_scale=0.05,
        diagonal=diagonal, seed=4,
    )  # fmt: skip
    assert isinstance(strategy.es.adapt_sigma, cma.sigma_adaptation.CMAAdaptSigmaCSA)
    rng = np.random.default_rng(0)
    for round_index in range(3):
        strategy.tell(RoundAnswers(strategy.ask(round_index), _choices(strategy, rng)))
    unanswered = strategy.ask(3)  # every holder refused round 3: it is never told
    assert strategy.ask(4) == unanswered
    outcome = strategy.tell(RoundAnswers(unanswered, _choices(strategy, rng)))
    assert len(outcome.steps) == 1
    assert strategy.ask(5) != unanswered
