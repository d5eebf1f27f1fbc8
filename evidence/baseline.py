"""The backprop baseline: the same model fine-tuned on the pooled training data with gradients.

What a team that could pool its data would do instead: LoRA adapters (``peft``) or full
fine-tuning of the last ``last_k_blocks`` decoder blocks (0 = all of them), trained with
AdamW on the same classification question the holders answer (cross-entropy over the label
words). Training stops at the first epoch whose accuracy on a selection set (never the test
split) reaches the target utility, so attacks compare models of equal utility; if no epoch
does, the last one is kept and the report says so.

The same trainer makes LiRA's reference models (trained on data that excludes the targets).
Batch order and LoRA's initialization come from a seeded generator: this is the baseline's
own training randomness, nothing a data holder's privacy depends on.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from sottovoce.common.errors import ConfigError
from sottovoce.common.fitness import Fitness, PreparedBatch
from sottovoce.evidence.scoring import SharedPrefixScorer, decoder_layout

METHODS = ("lora", "full")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class BaselineConfig:
    """How the backprop baseline (and LiRA's reference models) are trained."""

    method: str = "lora"
    last_k_blocks: int = 2
    epochs: int = 3
    learning_rate: float = 1e-3
    lora_rank: int = 8
    lora_alpha: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"baseline method: one of {', '.join(METHODS)}, got {self.method!r}")
        if self.last_k_blocks < 0:
            raise ConfigError(f"baseline last_k_blocks: must be >= 0, got {self.last_k_blocks}")
        if self.epochs < 1:
            raise ConfigError(f"baseline epochs: must be >= 1, got {self.epochs}")
        if not self.learning_rate > 0:
            raise ConfigError(f"baseline learning_rate: must be > 0, got {self.learning_rate}")

    def first_trained_block(self, model: nn.Module) -> int | None:
        """The first block training changes (the shared-prefix split), None for all blocks."""
        n_layers = len(decoder_layout(model).layers)
        if self.last_k_blocks == 0 or self.last_k_blocks >= n_layers:
            return None
        return n_layers - self.last_k_blocks


@dataclass
class TrainingResult:
    """A trained model and what training it took."""

    model: nn.Module
    epochs_run: int
    steps: int
    wall_seconds: float
    trainable_parameters: int = 0
    trainable_names: list[str] = field(default_factory=list)
    selection_accuracy: list[float] = field(default_factory=list)
    reached_target: bool | None = None


def train(
    base: nn.Module,
    scorer: SharedPrefixScorer,
    train_set: str,
    config: BaselineConfig,
    *,
    selection_set: str | None = None,
    target_accuracy: float | None = None,
    epochs: int | None = None,
    in_place: bool = False,
) -> TrainingResult:
    """Fine-tune a copy of ``base`` on ``scorer``'s set ``train_set``; ``base`` is untouched.

    ``in_place`` trains ``base`` itself instead (a process that needs nothing else of it
    saves a model copy's memory).

    With ``target_accuracy``, stops after the first epoch whose accuracy on
    ``selection_set`` reaches it. ``epochs`` overrides the config's (reference models train
    exactly as long as the baseline did).
    """
    label_ids = _label_ids(scorer.fitness)
    model = trainable_copy(base, config, in_place=in_place)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    order = torch.Generator().manual_seed(config.seed)
    batches = list(scorer.batches(train_set))
    started = time.perf_counter()
    result = TrainingResult(
        model=model,
        epochs_run=0,
        steps=0,
        wall_seconds=0.0,
        trainable_parameters=sum(p.numel() for p in params),
        trainable_names=[name for name, _ in named],
    )
    for _ in range(epochs or config.epochs):
        for index in torch.randperm(len(batches), generator=order).tolist():
            batch, prefix = batches[index]
            loss = -label_log_probs(scorer.logits(model, batch, prefix), batch, label_ids).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            result.steps += 1
        result.epochs_run += 1
        if selection_set is not None:
            result.selection_accuracy.append(scorer.score(model, selection_set).accuracy())
            if target_accuracy is not None:
                result.reached_target = result.selection_accuracy[-1] >= target_accuracy
                if result.reached_target:
                    break
    result.wall_seconds = time.perf_counter() - started
    for param in params:
        param.requires_grad_(False)
    return result


def trainable_copy(base: nn.Module, config: BaselineConfig, *, in_place: bool = False) -> nn.Module:
    """A deep copy of ``base`` whose trainable parameters are the config's, and only those."""
    model = base if in_place else copy.deepcopy(base)
    for param in model.parameters():
        param.requires_grad_(False)
    first = config.first_trained_block(model)
    if config.method == "lora":
        return _with_lora(model, config, first)
    parts = decoder_layout(model)
    trained: list[nn.Module] = [*parts.layers[first or 0 :], parts.norm]
    if first is None:
        trained = [model]
    for module in trained:
        for param in module.parameters():
            param.requires_grad_(True)
    return model


def label_log_probs(
    logits: torch.Tensor, batch: PreparedBatch, label_ids: torch.Tensor
) -> torch.Tensor:
    """Differentiable log-probability of each row's right label among the label words."""
    if batch.labels is None:
        raise ConfigError("the backprop baseline needs a classification fitness (labels)")
    label_logits = logits[:, -1, :].index_select(-1, label_ids.to(logits.device)).float()
    log_probs = torch.log_softmax(label_logits, dim=-1)
    return log_probs.gather(1, batch.labels.to(logits.device)[:, None]).squeeze(1)


def _with_lora(model: nn.Module, config: BaselineConfig, first: int | None) -> nn.Module:
    from peft import LoraConfig, get_peft_model  # an optional dependency: only evidence uses it

    n_layers = len(decoder_layout(model).layers)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        layers_to_transform=None if first is None else list(range(first, n_layers)),
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations inside peft
        torch.manual_seed(config.seed)  # peft draws LoRA's A from the global generator
        return get_peft_model(model, lora)


def _label_ids(fitness: Fitness) -> torch.Tensor:
    ids = getattr(fitness, "label_token_ids", None)
    if ids is None:
        raise ConfigError(
            "the backprop baseline supports classification fitness only (label words)"
        )
    return torch.tensor(list(ids), dtype=torch.long)
