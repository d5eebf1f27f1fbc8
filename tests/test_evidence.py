"""``sottovoce evaluate``: the attacks on planted cases with known answers, and the report.

The planted case: a tiny word-level model whose every example is one word of its own with a
random label. Only memorization can fit the members, and a model that never saw a word has
nothing to go on, so a memorizing model must be caught at low FPR and an untouched one not.
The model is trained by the project's own backprop baseline trainer, as the issue asks.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sottovoce.cli import main
from sottovoce.common.data import canonical_line, records_hash, sentiment_records
from sottovoce.common.errors import ConfigError, DataError
from sottovoce.common.fitness import build_fitness
from sottovoce.common.models import load_model
from sottovoce.common.protocol.messages import FitnessSpec
from sottovoce.common.quality import ood_records
from sottovoce.evidence.baseline import BaselineConfig, train
from sottovoce.evidence.datasets import bundled_sentiment_data
from sottovoce.evidence.membership import (
    AttackError,
    evaluate_attack,
    logit_confidence,
    offline_lira_scores,
    tpr_at_fpr,
)
from sottovoce.evidence.scoring import SharedPrefixScorer
from sottovoce.server.export import export_run
from sottovoce.simulate import simulate
from tests.helpers import FITNESS, TINY, tiny_records, write_run_config

WORDS = 800


# -- metrics ---------------------------------------------------------------------------------
def test_metrics_on_known_score_distributions() -> None:
    rng = np.random.default_rng(0)
    separated = evaluate_attack("x", rng.normal(10, 1, 200), rng.normal(0, 1, 400), resamples=50)
    assert separated.auc.value == 1.0 and separated.tpr_at_fpr[0.01] is not None
    assert separated.tpr_at_fpr[0.01].value == 1.0
    assert separated.tpr_at_fpr[0.001] is None  # 400 non-members cannot resolve 0.1 %

    same = evaluate_attack("x", rng.normal(0, 1, 1000), rng.normal(0, 1, 1000), resamples=100)
    assert 0.45 < same.auc.value < 0.55
    assert same.auc.low < 0.5 < same.auc.high
    low = same.tpr_at_fpr[0.01]
    assert low is not None and low.value < 0.03 and low.low <= low.value <= low.high

    # TPR at FPR alpha: the best threshold that lets at most alpha of non-members through.
    members, nonmembers = np.array([5.0, 4.0, 0.5]), np.array([4.5, 1.0, 0.0, -1.0])
    assert tpr_at_fpr(members, nonmembers, 0.0) == pytest.approx(1 / 3)
    assert tpr_at_fpr(members, nonmembers, 0.25) == pytest.approx(2 / 3)


def test_attack_inputs_are_checked() -> None:
    with pytest.raises(AttackError, match="NaN"):
        evaluate_attack("x", np.array([1.0, np.nan]), np.array([0.0, 1.0]))
    with pytest.raises(AttackError, match="at least 2 reference"):
        offline_lira_scores(np.zeros(3), [np.zeros(3)])
    with pytest.raises(AttackError, match="cover"):
        offline_lira_scores(np.zeros(3), [np.zeros(4), np.zeros(4)])


def test_logit_confidence_is_log_odds_and_stable() -> None:
    p = np.array([0.1, 0.5, 0.9])
    assert logit_confidence(np.log(p)) == pytest.approx(np.log(p / (1 - p)))
    assert np.isfinite(logit_confidence(np.array([0.0, -1e-30]))).all()


def test_lira_calibrates_per_example_difficulty() -> None:
    """Hard examples look like non-members to a loss attack; LiRA compares each to itself."""
    rng = np.random.default_rng(1)
    difficulty = rng.normal(0, 3, 1000)  # per-example offset shared by every model
    is_member = np.arange(1000) < 500
    target = difficulty + 0.8 * is_member + rng.normal(0, 0.2, 1000)
    references = [difficulty + rng.normal(0, 0.2, 1000) for _ in range(4)]
    to_log_prob = lambda phi: -np.logaddexp(0, -phi)  # noqa: E731  (phi -> log sigmoid(phi))
    loss = evaluate_attack(
        "loss", to_log_prob(target[is_member]), to_log_prob(target[~is_member]), resamples=0
    )
    lira_scores = offline_lira_scores(to_log_prob(target), [to_log_prob(r) for r in references])
    lira = evaluate_attack("lira", lira_scores[is_member], lira_scores[~is_member], resamples=0)
    assert loss.auc.value < 0.65 < 0.9 < lira.auc.value


# -- the planted case ------------------------------------------------------------------------
def canary_model() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A one-block Llama over a word-level vocabulary: each example can be its own word."""
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "=": 4, "0": 5, "1": 6}
    vocab.update({f"w{i}": 7 + i for i in range(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        eos_token="</s>",
    )  # fmt: skip
    tokenizer.padding_side = "left"
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.eval(), tokenizer


def word_records(words: list[int], rng: random.Random) -> list[dict[str, object]]:
    return [{"text": f"w{word}", "label": rng.randint(0, 1)} for word in words]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models train faster on one thread than on contended many."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_planted_memorization_is_caught_and_an_untouched_model_is_not() -> None:
    model, tokenizer = canary_model()
    fitness = build_fitness(
        FitnessSpec(prompt_template="{text} =", label_words=("0", "1")), tokenizer
    )
    rng = random.Random(0)
    words = list(range(WORDS))
    rng.shuffle(words)
    members, nonmembers, pool = (
        word_records(words[:100], rng),
        word_records(words[100:300], rng),
        word_records(words[300:700], rng),
    )
    scorer = SharedPrefixScorer(model, fitness, None, max_batch=16)
    for name, records in (("members", members), ("nonmembers", nonmembers), ("pool", pool)):
        scorer.add(name, records)
    config = BaselineConfig(method="full", last_k_blocks=0, epochs=40, learning_rate=1e-2)
    memorizer = train(model, scorer, "members", config, selection_set="members")
    assert memorizer.selection_accuracy[-1] == 1.0  # it fits random labels: memorization

    references = []
    for k in range(4):
        scorer.add_subset(f"ref{k}", "pool", np.random.default_rng(k).permutation(25)[:12].tolist())
        # A reference never sees a target word: a few epochs show how its shared weights drift.
        reference = train(model, scorer, f"ref{k}", dataclasses.replace(config, seed=k), epochs=10)
        references.append(
            (scorer.score(reference.model, "members").score,
             scorer.score(reference.model, "nonmembers").score)
        )  # fmt: skip

    def attacks(target: torch.nn.Module) -> tuple[float, float, float, float]:
        m, n = scorer.score(target, "members").score, scorer.score(target, "nonmembers").score
        loss = evaluate_attack("loss", m, n, resamples=0)
        lira = evaluate_attack(
            "lira",
            offline_lira_scores(m, [r for r, _ in references]),
            offline_lira_scores(n, [r for _, r in references]),
            resamples=0,
        )
        assert loss.tpr_at_fpr[0.01] is not None and lira.tpr_at_fpr[0.01] is not None
        return (
            loss.auc.value,
            loss.tpr_at_fpr[0.01].value,
            lira.auc.value,
            lira.tpr_at_fpr[0.01].value,
        )

    loss_auc, loss_tpr, lira_auc, lira_tpr = attacks(memorizer.model)
    assert loss_auc > 0.95 and loss_tpr > 0.5  # caught at 1 % FPR: most members
    assert lira_auc > 0.75 and lira_tpr > 0.05  # 5x chance at 1 % FPR
    loss_auc, loss_tpr, lira_auc, lira_tpr = attacks(model)  # never saw any of the data
    assert loss_auc < 0.65 and lira_auc < 0.65
    assert loss_tpr <= 0.05 and lira_tpr <= 0.05


# -- the shared prefix and the baseline trainer ----------------------------------------------
def test_shared_prefix_scores_equal_full_forwards() -> None:
    """Scoring from the cached prefix is the same computation as a full forward."""
    loaded = load_model(TINY)
    fitness = build_fitness(FITNESS, loaded.tokenizer)
    records = tiny_records(40, seed=3)
    config = BaselineConfig(method="lora", last_k_blocks=1, epochs=1, learning_rate=1e-2)
    split = config.first_trained_block(loaded.model)
    assert split == 1  # the tiny model has two blocks
    shared, full = (
        SharedPrefixScorer(loaded.model, fitness, s, max_batch=8) for s in (split, None)
    )
    for scorer in (shared, full):
        scorer.add("train", records)
    trained = train(loaded.model, shared, "train", config).model
    for model in (loaded.model, trained):
        a, b = shared.score(model, "train").score, full.score(model, "train").score
        assert np.allclose(a, b, atol=1e-5)
    assert not np.allclose(
        shared.score(trained, "train").score, full.score(loaded.model, "train").score
    )


def test_baseline_stops_at_the_target_utility_and_leaves_the_base_alone() -> None:
    loaded = load_model(TINY)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    fitness = build_fitness(FITNESS, loaded.tokenizer)
    scorer = SharedPrefixScorer(loaded.model, fitness, None, max_batch=8)
    scorer.add("train", tiny_records(32, seed=4))
    config = BaselineConfig(method="full", last_k_blocks=1, epochs=5, learning_rate=1e-3)
    result = train(
        loaded.model, scorer, "train", config, selection_set="train", target_accuracy=0.0
    )
    assert result.epochs_run == 1 and result.reached_target is True and result.steps == 4
    after = loaded.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    with pytest.raises(ConfigError, match="method"):
        BaselineConfig(method="adam")


# -- data sets -------------------------------------------------------------------------------
def test_bundled_sets_are_disjoint_and_members_are_checked(tmp_path: Path) -> None:
    config_path = write_run_config(
        tmp_path / "run.toml",
        simulate={"holders": 2, "test_size": 100, "dev_size": 20, "train_size": 60},
    )
    from sottovoce.common.config import load_config
    from sottovoce.common.data import split_sentiment

    config = load_config(config_path)
    splits = split_sentiment(sentiment_records(), test_size=100, dev_size=20)
    members = splits.train[:60]
    data = bundled_sentiment_data(config, members, ood=["amazon"], ood_cap=50)
    sets = [data.members, data.nonmembers, data.reference_pool, data.selection, data.heldout]
    lines = [{canonical_line(r) for r in records} for records in sets]
    assert sum(len(s) for s in lines) == len(set().union(*lines))  # pairwise disjoint
    assert len(data.nonmembers) == 60 and len(data.reference_pool) == 120
    assert len(data.ood["amazon"]) == 50
    with pytest.raises(DataError, match="not the bundled split"):
        bundled_sentiment_data(config, splits.train[1:61])


def test_amazon_reviews_are_bundled_as_an_out_of_domain_set() -> None:
    records = sentiment_records("amazon")
    assert len(records) == 2943 and {r["label"] for r in records} == {0, 1}
    with pytest.raises(ConfigError, match="unknown bundled"):
        sentiment_records("tweets")


# -- the command -----------------------------------------------------------------------------
def test_evaluate_a_simulated_run_end_to_end(tmp_path: Path) -> None:
    config = write_run_config(
        tmp_path / "run.toml",
        run={"name": "ev", "max_rounds": 4, "bit_budget": 100.0},
        evaluation={"mode": "full"},
        simulate={"holders": 2, "test_size": 60, "dev_size": 10, "train_size": 60, "ood_cap": 100},
    )
    run_dir = tmp_path / "sim"
    run_report = simulate(config, run_dir=run_dir, state_dir=tmp_path / "ledgers")
    holder_report = json.loads((run_dir / "holders" / "holder-0" / "report.json").read_text())
    assert holder_report["cost"]["bytes_sent"] > 0 and holder_report["cost"]["forward_passes"] > 0
    # Still a language model? simulate measures the held-out split, Amazon and the text ...
    quality = run_report["quality"]
    assert quality["sets"]["heldout"]["sha256"] == run_report["heldout_sha256"]
    assert quality["sets"]["heldout"]["accuracy_tuned"] == run_report["heldout_metric_after"]
    assert quality["sets"]["amazon"]["sha256"] == records_hash(ood_records(cap=100)["amazon"])
    assert {e["role"] for e in quality["sets"].values()} == {
        "in-domain held-out (test split)",
        "out-of-domain",
    }
    assert quality["sets"]["heldout"]["kl_base_to_tuned_nats"] >= 0.0
    assert quality["perplexity"]["ratio"] > 0 and quality["perplexity"]["scored_tokens"] > 1000
    # ... and the coordinator's own report has the public sets only, with the same figures.
    served = json.loads((run_dir / "coordinator" / "report.json").read_text())
    public = served["quality_on_public_sets"]
    assert set(public["sets"]) == {"amazon"} and "kl_definition" not in public
    assert public["perplexity"] == quality["perplexity"]

    out = tmp_path / "evaluation"
    args = ["evaluate", "--run", str(run_dir), "--out", str(out), "--ood", "amazon",
            "--ood-cap", "100", "--reference-models", "2", "--baseline-blocks", "1",
            "--baseline-epochs", "1", "--resamples", "20", "--threads", "1"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    models = set(report["utility"])
    assert len(models) == 3 and "backprop baseline" in models
    run_name = next(m for m in models if m.startswith("bboxer"))
    for row in report["utility"].values():
        assert set(row) == {"test (in-domain)", "amazon (out-of-domain)", "members (train)"}
    assert set(report["quality"]) == {run_name, "backprop baseline"}
    measured = report["quality"][run_name]
    assert set(measured["sets"]) == {"heldout", "ood:amazon"}
    assert measured["sets"]["ood:amazon"]["examples"] == 100
    held = measured["sets"]["heldout"]
    assert held["accuracy_tuned"] == report["utility"][run_name]["test (in-domain)"]["accuracy"]
    # The same log measured by simulate and by evaluate: the same perplexity and KL.
    assert measured["perplexity"]["ratio"] == pytest.approx(quality["perplexity"]["ratio"])
    assert held["kl_base_to_tuned_nats"] == pytest.approx(
        quality["sets"]["heldout"]["kl_base_to_tuned_nats"], rel=1e-6, abs=1e-12
    )
    assert "Still a language model?" in (out / "report.md").read_text()
    assert [a["attack"] for a in report["membership_inference"]["results"][run_name]] == [
        "loss-threshold",
        "offline-LiRA",
    ]
    bound = report["bound"][run_name]
    assert bound["bits_spent"] == run_report["bits_spent_total"] and bound["n"] == 60
    assert bound["test_risk_bound"] == pytest.approx(bound["train_risk"] + bound["slack"])
    transcript = bound["transcript"]
    assert transcript["transcript_bits"] == run_report["generalization_bound"]["transcript_bits"]
    assert transcript["old_bound"] == pytest.approx(bound["test_risk_bound"])
    assert report["cost"]["runs"][run_name]["wire_bytes_total"] > 0
    baseline_cost = report["cost"]["baseline"]  # measured in the baseline's own process
    assert baseline_cost["peak_rss_bytes"] > 0 and baseline_cost["training_steps"] > 0
    assert baseline_cost["forward_passes"] > baseline_cost["training_steps"]
    assert "backprop baseline" in (out / "report.md").read_text()
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert (out / "roc.png").read_bytes().startswith(b"\x89PNG")

    # The exported checkpoint is the same model as the replayed log.
    export_run(run_dir / "coordinator", tmp_path / "export")
    again = tmp_path / "again"
    args = ["evaluate", "--run", str(run_dir), "--checkpoint", str(tmp_path / "export"),
            "--out", str(again), "--baseline", "none", "--resamples", "0", "--ood", "amazon",
            "--ood-cap", "100"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    replayed = json.loads((again / "report.json").read_text())["utility"][run_name]
    assert replayed == report["utility"][run_name]

    # Bad input: one line, exit 2, nothing written.
    result = CliRunner().invoke(main, ["evaluate", "--run", str(run_dir), "--out", str(out)])
    assert result.exit_code == 2 and "not empty" in result.output
    result = CliRunner().invoke(
        main, ["evaluate", "--run", str(tmp_path), "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and "not a run directory" in result.output
    assert not (tmp_path / "x").exists()
