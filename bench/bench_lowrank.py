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
bit-equal: other rounding and summation order). Interleaved repeats; the minimum time of
each is reported.

    python bench/bench_lowrank.py                      # every Linear of every block, r = 1
    python bench/bench_lowrank.py --patterns '*o_proj.weight' --lam 8 --rows 4
"""

from __future__ import annotations

import argparse
import json
import time

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
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    spec = ParametrizationSpec(kind="lowrank", rank=args.rank, patterns=tuple(args.patterns))
    parametrization = build_parametrization(spec)
    parametrization.attach(loaded.model)
    words = ("n", "p") if args.model.startswith("tiny") else (" negative", " positive")
    fitness = build_fitness(FitnessSpec(label_words=words), loaded.tokenizer)
    records = sentiment_records()[: args.rows]
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

    timings: dict[str, list[float]] = {"plain": [], "population": [], "one_at_a_time": []}
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, run in (
                ("plain", plain),
                ("population", population),
                ("one_at_a_time", one_at_a_time),
            ):
                started = time.perf_counter()
                outputs[name] = run()
                timings[name].append(time.perf_counter() - started)
    best = {name: min(values) for name, values in timings.items()}
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
                "seconds_min": {k: round(v, 4) for k, v in best.items()},
                "throughput_vs_plain": {
                    "population": round(best["plain"] / best["population"], 3),
                    "one_at_a_time": round(best["plain"] / best["one_at_a_time"], 3),
                },
                "max_abs_logit_difference_population_vs_merged": difference,
                "max_abs_logit": scale,
            }
        )
    )


if __name__ == "__main__":
    main()
