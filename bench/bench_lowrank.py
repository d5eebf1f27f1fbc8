"""Candidate throughput of the batched low-rank population against a plain forward.

A holder scoring lambda ``lowrank`` candidates runs one forward over lambda copies of a
batch's rows: the base matmuls run once over all of them and each candidate adds its own
rank-r term ``(s/r) (x B) A^T`` to its rows (``Parametrization.population``). This measures,
in one run, on the same lambda x B rows (movie-review prompts):

* ``plain``: ``model(**batch)`` with no parametrization hooks (plain inference);
* ``population``: the same forward with every candidate's low-rank term;
* ``one at a time``: lambda forwards of B rows, each candidate merged into the weights
  in place and restored from a backup (the exact form export shares);

and prints candidate throughput relative to plain inference (target >= 0.9x), plus the
largest logit difference between the batched and the merged forms (they are not
bit-equal: other rounding and summation order). The forms run interleaved in each repeat,
so the machine's noise hits them alike; a ratio is computed per repeat (plain time over
the form's time in the same repeat) and its median and range are reported, with the
median seconds, both in process CPU time (``cpu``: on a shared host it leaves out the time
other processes hold the core; with one thread it is the work done) and in wall time.
The population's time includes generating every candidate's factors (once per
population, as a holder does once per task), also reported on its own.

``--min-tokens N`` makes longer rows: each row's text joins consecutive review sentences
until its prompt has at least N tokens (a real holder's rows are longer than one
sentence, and there the base matmuls weigh more). ``--time-one-at-a-time no`` runs the
one-at-a-time form once, for the logit difference only (it costs as much as plain).
``--without-head yes`` also times both forms without the output head (``model.model``:
the decoder's last hidden state), which a holder's fitness mostly skips (it computes only
the label words' logits), so that the population's cost is seen against the decoder alone.

    python bench/bench_lowrank.py                      # every Linear of every block, r = 1
    python bench/bench_lowrank.py --patterns 'model.layers.*.self_attn.o_proj.weight'
    python bench/bench_lowrank.py --min-tokens 256 --time-one-at-a-time no
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from sottovoce.client.evaluator import repeat_batch
from sottovoce.common.data import sentiment_records
from sottovoce.common.fitness import build_fitness
from sottovoce.common.models import load_model
from sottovoce.common.parametrizations.base import ParametrizationSpec
from sottovoce.common.parametrizations.registry import build_parametrization
from sottovoce.common.protocol.messages import Candidate, FitnessSpec
from sottovoce.common.protocol.seeds import candidate_seed
from sottovoce.common.steplog import as_float32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--patterns", nargs="*", default=["model.layers.*_proj.weight"])
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--lam", type=int, default=8)
    parser.add_argument("--rows", type=int, default=4, help="examples per candidate")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-tokens", type=int, default=0, help="join sentences up to this")
    parser.add_argument("--time-one-at-a-time", choices=("yes", "no"), default="yes")
    parser.add_argument("--without-head", choices=("yes", "no"), default="no")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    spec = ParametrizationSpec(kind="lowrank", rank=args.rank, patterns=tuple(args.patterns))
    parametrization = build_parametrization(spec)
    parametrization.attach(loaded.model)
    words = ("n", "p") if args.model.startswith("tiny") else (" negative", " positive")
    fitness = build_fitness(FitnessSpec(label_words=words), loaded.tokenizer)
    records = long_records(fitness, args.rows, args.min_tokens)
    (batch,) = fitness.prepare(records, max_batch=args.rows)
    rows = repeat_batch(batch, args.lam)
    candidates = [
        Candidate(seed=candidate_seed(1, 0, i), scale=as_float32(0.01)) for i in range(args.lam)
    ]
    model = loaded.model

    def plain() -> torch.Tensor:
        return model(**rows.model_inputs()).logits

    def population() -> torch.Tensor:
        context = parametrization.population(candidates)
        assert context is not None
        with context:
            return model(**rows.model_inputs()).logits

    def one_at_a_time() -> torch.Tensor:
        parts = []
        for candidate in candidates:
            with parametrization.perturbed(candidate.seed, candidate.scale):
                parts.append(model(**batch.model_inputs()).logits)
        return torch.cat(parts)

    def factors_only() -> None:
        context = parametrization.population(candidates)
        assert context is not None
        with context:
            pass

    def plain_body() -> torch.Tensor:  # the decoder without the output head
        return model.model(**rows.model_inputs()).last_hidden_state

    def population_body() -> torch.Tensor:
        context = parametrization.population(candidates)
        assert context is not None
        with context:
            return model.model(**rows.model_inputs()).last_hidden_state

    forms = [("plain", plain), ("population", population)]
    if args.time_one_at_a_time == "yes":
        forms.append(("one_at_a_time", one_at_a_time))
    if args.without_head == "yes":
        forms += [("plain_without_head", plain_body), ("population_without_head", population_body)]
    forms.append(("population_factors", factors_only))
    baseline = {
        name: "plain_without_head" if "without_head" in name else "plain" for name, _ in forms
    }
    wall: dict[str, list[float]] = {name: [] for name, _ in forms}
    cpu: dict[str, list[float]] = {name: [] for name, _ in forms}
    outputs: dict[str, Any] = {}
    with torch.inference_mode():
        if args.time_one_at_a_time == "no":
            outputs["one_at_a_time"] = one_at_a_time()
        for _ in range(args.repeats):
            for name, run in forms:
                started, started_cpu = time.perf_counter(), time.process_time()
                outputs[name] = run()
                cpu[name].append(time.process_time() - started_cpu)
                wall[name].append(time.perf_counter() - started)

    def ratios(times: dict[str, list[float]]) -> dict[str, list[float]]:
        """Per repeat, the plain form's time over this form's (same repeat)."""
        return {
            name: [p / t for p, t in zip(times[baseline[name]], times[name], strict=True)]
            for name, _ in forms
            if name != baseline[name] and name != "population_factors"
        }

    def summary(times: dict[str, list[float]]) -> dict[str, Any]:
        measured = ratios(times)
        return {
            "seconds_median": {k: round(statistics.median(v), 4) for k, v in times.items()},
            "throughput_vs_plain_median": {
                k: round(statistics.median(v), 3) for k, v in measured.items()
            },
            "throughput_vs_plain_range": {
                k: [round(min(v), 3), round(max(v), 3)] for k, v in measured.items()
            },
        }

    difference = (outputs["population"] - outputs["one_at_a_time"]).abs().max().item()
    scale = outputs["one_at_a_time"].abs().max().item()
    print(
        json.dumps(
            {
                "model": args.model,
                "dtype": "float32",
                "threads": args.threads,
                "matrices": len(parametrization.touched_modules()),
                "rank": args.rank,
                "lambda": args.lam,
                "rows_per_candidate": args.rows,
                "tokens_per_row": int(rows.input_ids.shape[1]),
                "repeats": args.repeats,
                "cpu": summary(cpu),
                "wall": summary(wall),
                "max_abs_logit_difference_population_vs_merged": difference,
                "max_abs_logit": scale,
            }
        )
    )


def long_records(fitness: Any, count: int, min_tokens: int) -> list[dict[str, object]]:
    """``count`` records; with ``min_tokens``, each joins consecutive sentences until its
    rendered prompt has at least that many tokens (0: one sentence a record)."""
    sentences = sentiment_records()
    if min_tokens <= 0:
        return sentences[:count]
    records: list[dict[str, object]] = []
    position = 0
    while len(records) < count:
        first = sentences[position]
        texts = [str(first["text"])]
        position += 1
        while True:
            (batch,) = fitness.prepare([{**first, "text": " ".join(texts)}], max_batch=1)
            if int(batch.attention_mask.sum()) >= min_tokens:
                break
            texts.append(str(sentences[position]["text"]))
            position += 1
        records.append({**first, "text": " ".join(texts)})
    return records


if __name__ == "__main__":
    main()
