"""Is the tuned model still a language model? The measures every report gives next to the gain.

Label-word scoring reads two logits of one position, so a fitness can improve while the
rest of the model is destroyed (issue 11: the old demo took its final-norm scales to
factors of 0.03..36 and its perplexity from 17 to 1e9). Three figures show it:

* **Perplexity ratio** to the base model on a bundled general-text set
  (``datasets/general_text.txt``, public domain; evaluation only, nobody trains on it). The
  text is tokenized once without special tokens and cut into fixed, non-overlapping
  windows of ``window`` tokens (the last partial window is dropped, at most ``max_tokens``
  tokens in all). Each window is scored on its own: every token after the window's first is
  predicted from the tokens before it in that window, so a window of W tokens scores W - 1.
  Perplexity = exp(total negative log-likelihood / scored tokens), summed in float64: exact
  (no sampling, no stride approximation), and cheap enough to run for every report.
* **Accuracy on out-of-domain sets** with the task's own fitness (the bundled Amazon
  product-review sentences by default, :func:`ood_records`), with a paired McNemar test
  against the base. With two label words, also the rate of label-1 answers and the
  threshold-free AUC of the label margin (logit of label 1 minus label 0): an accuracy
  drop with the AUC unchanged means the decision threshold moved (the label prior),
  not that the model lost what it knew.
* **KL(base || tuned)** of the full next-token distribution at each prompt's last position,
  in nats, averaged over the prompts: sum_v p_base(v) (log p_base(v) - log p_tuned(v)),
  computed in float64 from the two models' logits.

An unchanged model gives a ratio of exactly 1.0 and a KL of exactly 0.0: the same
computation on the same inputs. The functions here do plain forward passes (what a
coordinator with the weights and no cache can run); ``sottovoce.evidence.drift`` measures
the same figures from a shared, cached prefix where many models are measured.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from sottovoce.common.data import Record, records_hash, sentiment_records
from sottovoce.common.errors import ConfigError, DataError
from sottovoce.common.fitness import Fitness, PreparedBatch
from sottovoce.common.stats import accuracy_interval, mcnemar_pvalue

GENERAL_TEXT_FILE = "general_text.txt"
GENERAL_TEXT_NAME = "general text: Carroll, Alice's Adventures in Wonderland, ch. I-III"
WINDOW = 512
MAX_TOKENS = 8192
WINDOWS_PER_BATCH = 1  # a window's logits: 512 x 49,152 float32 = 100 MB for SmolLM2
OOD_DEFAULT = ("amazon",)
OOD_CAP = 1000
OOD_SEED = 0


# -- the general-text set ----------------------------------------------------------------------
def general_text() -> str:
    """The bundled general-text set; a DataError (one line) if it is missing or unreadable."""
    try:
        resource = resources.files("sottovoce.common") / "datasets" / GENERAL_TEXT_FILE
        text = resource.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"the bundled general-text set {GENERAL_TEXT_FILE} cannot be read ({exc}); "
            "reinstall sottovoce"
        ) from None
    if not text.strip():
        raise DataError(f"the bundled general-text set {GENERAL_TEXT_FILE} is empty")
    return text


@dataclass(frozen=True)
class TextWindows:
    """A text cut into fixed windows, as batches ready for a forward pass."""

    batches: list[PreparedBatch]
    window: int
    tokens: int
    scored_tokens: int
    text_sha256: str

    def describe(self) -> dict[str, Any]:
        """What the perplexity was measured on, for a report."""
        return {
            "set": GENERAL_TEXT_NAME,
            "file": f"sottovoce/common/datasets/{GENERAL_TEXT_FILE}",
            "text_sha256": self.text_sha256,
            "window_tokens": self.window,
            "windows": sum(batch.size for batch in self.batches),
            "tokens": self.tokens,
            "scored_tokens": self.scored_tokens,
            "how": "fixed, non-overlapping windows, each scored on its own; every token "
            "after a window's first is predicted from the tokens before it in the window",
        }


def text_windows(
    tokenizer: PreTrainedTokenizerBase,
    text: str | None = None,
    *,
    window: int = WINDOW,
    max_tokens: int = MAX_TOKENS,
    max_positions: int | None = None,
    per_batch: int = WINDOWS_PER_BATCH,
) -> TextWindows:
    """``text`` (default: the bundled set) as windows of ``window`` tokens (capped at the
    model's ``max_positions``), at most ``max_tokens`` tokens, ``per_batch`` windows a batch."""
    text = general_text() if text is None else text
    if max_positions is not None:
        window = min(window, max_positions)
    if window < 2 or per_batch < 1:
        raise ConfigError(f"text windows: need window >= 2 and per_batch >= 1 (got {window})")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    count = min(len(ids), max_tokens) // window
    if count == 0:
        raise DataError(f"the general-text set has {len(ids)} tokens, fewer than a window")
    rows = torch.tensor(ids[: count * window], dtype=torch.long).view(count, window)
    batches = []
    for start in range(0, count, per_batch):
        chunk = rows[start : start + per_batch]
        batches.append(
            PreparedBatch(
                input_ids=chunk,
                attention_mask=torch.ones_like(chunk),
                position_ids=torch.arange(window).expand_as(chunk).contiguous(),
                logits_to_keep=0,  # every position
                example_index=torch.arange(start, start + chunk.shape[0]),
            )
        )
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return TextWindows(batches, window, count * window, count * (window - 1), digest)


def window_nll(logits: torch.Tensor, batch: PreparedBatch, chunk: int = 256) -> float:
    """Summed negative log-likelihood (nats) of every window token after the first.

    Log-softmax in float64, ``chunk`` positions at a time (a full-vocabulary float64 row
    costs 0.4 MB for SmolLM2, so a whole window at once would cost 200 MB).
    """
    vocab = logits.shape[-1]
    flat = logits[:, :-1, :].reshape(-1, vocab)
    targets = batch.input_ids[:, 1:].reshape(-1).to(logits.device)
    total = 0.0
    for start in range(0, flat.shape[0], chunk):
        log_probs = torch.log_softmax(flat[start : start + chunk].double(), dim=-1)
        picked = log_probs.gather(-1, targets[start : start + chunk].unsqueeze(-1))
        total -= float(picked.sum().item())
    return total


@dataclass(frozen=True)
class Perplexity:
    """Total NLL over ``tokens`` scored tokens; ``value`` = exp(mean NLL)."""

    nll: float
    tokens: int

    @property
    def mean_nll(self) -> float:
        """Nats per scored token (the log of the perplexity; finite where it overflows)."""
        return self.nll / self.tokens

    @property
    def value(self) -> float:
        return math.exp(self.mean_nll) if self.mean_nll < 700 else math.inf


def forward_perplexity(model: nn.Module, windows: TextWindows) -> Perplexity:
    """Perplexity of ``model`` on ``windows`` with plain forward passes."""
    total = 0.0
    with torch.no_grad():
        for batch in windows.batches:
            logits = model(**batch.model_inputs()).logits
            total += window_nll(logits, batch)
    return Perplexity(total, windows.scored_tokens)


# -- prompts: out-of-domain accuracy and KL ------------------------------------------------------
def ood_records(
    names: Sequence[str] = OOD_DEFAULT, cap: int = OOD_CAP, seed: int = OOD_SEED
) -> dict[str, list[Record]]:
    """Bundled out-of-domain sets by name, each at most ``cap`` records (a seeded sample).

    The sample is the one ``sottovoce evaluate`` uses, so every report's Amazon figure is
    measured on the same sentences.
    """
    return {name: cap_records(sentiment_records(name), cap, seed) for name in names}


def cap_records(records: Sequence[Record], cap: int, seed: int) -> list[Record]:
    """``records`` as is if at most ``cap``, else a ``random.Random(seed)`` sample of ``cap``."""
    chosen = list(records)
    if len(chosen) > cap:
        random.Random(seed).shuffle(chosen)
        chosen = chosen[:cap]
    return chosen


def last_position_kl(base_logits: torch.Tensor, tuned_logits: torch.Tensor) -> torch.Tensor:
    """KL(base || tuned) in nats, per row, of the next-token distributions given as logits.

    Inputs are (rows, vocab) logits of the same prompts' last positions; float64 math, so an
    unchanged model gives exactly 0.
    """
    base = torch.log_softmax(base_logits.double(), dim=-1)
    tuned = torch.log_softmax(tuned_logits.double(), dim=-1)
    return (base.exp() * (base - tuned)).sum(dim=-1)


def label_margin(fitness: Fitness, logits: torch.Tensor) -> np.ndarray | None:
    """Per row, the last position's logit of label word 1 minus label word 0 (float64);
    None unless the fitness has exactly two label words."""
    ids = getattr(fitness, "label_token_ids", None)
    if ids is None or len(ids) != 2:
        return None
    last = logits[:, -1, :].double()
    return (last[:, ids[1]] - last[:, ids[0]]).cpu().numpy()


def forward_margins(
    model: nn.Module, fitness: Fitness, records: Sequence[Record], max_batch: int = 32
) -> tuple[np.ndarray, np.ndarray | None]:
    """Correctness and label margins (see :func:`label_margin`) of ``model``, plain forwards."""
    correct = np.zeros(len(records), dtype=bool)
    margins: np.ndarray | None = np.zeros(len(records))
    with torch.no_grad():
        for batch in fitness.prepare(list(records), max_batch=max_batch):
            logits = model(**batch.model_inputs()).logits
            index = batch.example_index.numpy()
            correct[index] = fitness.score(logits, batch).correct
            margin = label_margin(fitness, logits)
            if margin is None or margins is None:
                margins = None
            else:
                margins[index] = margin
    return correct, margins


def margin_auc(margins: np.ndarray, labels: np.ndarray) -> float | None:
    """ROC AUC of the label margin for label 1 vs 0 (Mann-Whitney U / pairs; ties count 1/2)."""
    positive, negative = margins[labels == 1], margins[labels == 0]
    if len(positive) == 0 or len(negative) == 0:
        return None
    from scipy.stats import mannwhitneyu  # here: a holder's process never needs scipy.stats

    statistic = mannwhitneyu(positive, negative, alternative="two-sided").statistic
    return float(statistic) / (len(positive) * len(negative))


# -- the report section -------------------------------------------------------------------------
@dataclass(frozen=True)
class QualityFigures:
    """One model's figures: perplexity, per-set correctness, and per-set KL to the base."""

    perplexity: Perplexity | None
    correct: Mapping[str, np.ndarray]
    kl: Mapping[str, float]
    margins: Mapping[str, np.ndarray] = field(default_factory=dict)


def quality_section(
    base: QualityFigures,
    tuned: QualityFigures,
    *,
    windows: TextWindows | None,
    sets: Mapping[str, list[Record]],
    roles: Mapping[str, str],
) -> dict[str, Any]:
    """The report's ``quality`` section: tuned vs base on every set, in one layout.

    ``roles`` says what each set is ("in-domain held-out", "out-of-domain"); sets without a
    role are left out.
    """
    section: dict[str, Any] = {}
    if windows is not None and base.perplexity is not None and tuned.perplexity is not None:
        log_ratio = tuned.perplexity.mean_nll - base.perplexity.mean_nll
        section["perplexity"] = {
            "base": base.perplexity.value,
            "tuned": tuned.perplexity.value,
            "ratio": math.exp(log_ratio) if log_ratio < 700 else math.inf,
            "log_ratio_nats_per_token": log_ratio,
            **windows.describe(),
        }
    per_set: dict[str, Any] = {}
    for name, role in roles.items():
        if name not in base.correct:
            continue
        before, after = base.correct[name].tolist(), tuned.correct[name].tolist()
        acc_b, lo_b, hi_b = accuracy_interval(before)
        acc_a, lo_a, hi_a = accuracy_interval(after)
        test = mcnemar_pvalue(before, after)
        entry: dict[str, Any] = {
            "role": role,
            "examples": len(before),
            "sha256": records_hash(sets[name]),
            "accuracy_base": acc_b,
            "accuracy_base_ci95": [lo_b, hi_b],
            "accuracy_tuned": acc_a,
            "accuracy_tuned_ci95": [lo_a, hi_a],
            "accuracy_change": acc_a - acc_b,
            "mcnemar": {
                "improved": test.improved,
                "worsened": test.worsened,
                "p_value": test.p_value,
            },
        }
        if name in tuned.kl:
            entry["kl_base_to_tuned_nats"] = tuned.kl[name]
        if name in base.margins and name in tuned.margins:
            entry.update(_prior_and_auc(base.margins[name], tuned.margins[name], sets[name]))
        per_set[name] = entry
    section["sets"] = per_set
    if any("margin_auc_base" in entry for entry in per_set.values()):
        section["margin_definition"] = (
            "label margin = logit of label word 1 minus label word 0 at the last position; "
            "answered_label_1 = how often it is > 0 (ties go to label 0); margin_auc = ROC AUC "
            "of the margin for the true label, which no shift of the threshold changes"
        )
    if tuned.kl:
        section["kl_definition"] = (
            "KL(base || tuned) of the full next-token distribution at each prompt's last "
            "position, in nats, averaged over the set's prompts"
        )
    return section


def _prior_and_auc(
    base: np.ndarray, tuned: np.ndarray, records: Sequence[Record]
) -> dict[str, Any]:
    try:
        labels = np.array([int(str(record["label"])) for record in records])
    except (KeyError, ValueError):
        return {}
    figures: dict[str, Any] = {"true_label_1_rate": float(labels.mean())}
    for name, margins in (("base", base), ("tuned", tuned)):
        figures[f"answered_label_1_{name}"] = float((margins > 0).mean())
        figures[f"margin_auc_{name}"] = margin_auc(margins, labels)
    return figures
