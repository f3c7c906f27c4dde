"""Control for the convergence benchmark: what the M-step does to the warm start with perfect data.

Rejection sampling can at best keep responses as good as the reference solutions. If supervised
steps on the reference solutions, taken through the same update code, optimizer, learning rate
and mini-batches as the benchmark's RL runs, lower held-out accuracy, then no allocation of
samples can make RAFT or GRPO raise it in that setting: the warm start or the optimizer settings
are the bottleneck, not where the samples go. This script runs the built-in RAFT configuration
with every prompt's sampled responses replaced by its reference solution (no sampling at all),
for each learning rate and mini-batch size asked for, and reports held-out accuracy along the way.

    python bench/controls.py                                   # lr 1e-5 1e-4 5e-4, mini-batch 8
    python bench/controls.py --lr 1e-4 --minibatch 8 32 --model DIR --set optim.warmup_steps=10

Writes OUT/results.json; each run lies in OUT/runs/lr<lr>-mb<size>/ (resumable).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

from gvmrl.analysis import eval_curve, load_run
from gvmrl.builtin.task import builtin_problems
from gvmrl.config import load_config
from gvmrl.data import format_prompt
from gvmrl.io import json_ready, write_json
from gvmrl.progress import format_table
from gvmrl.records import Rollouts
from gvmrl.rollout import Sample
from gvmrl.train import Trainer

from common import QUIET


@functools.cache
def reference_solutions() -> dict[str, str]:
    return {p.problem: p.solution for p in builtin_problems("default", "train")}


class ReferenceTrainer(Trainer):
    """The training loop with each prompt's responses replaced by its reference solution."""

    def sample(self, prompts, sizes, iteration, phase, round=0) -> Rollouts:
        solutions = reference_solutions()
        samples = []
        for i, record in enumerate(prompts):
            text = solutions[record.problem]
            prompt = format_prompt(self.tokenizer, record.problem, self.instruction)
            prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=False)
            response_ids = self.tokenizer.encode(
                text + self.tokenizer.eos_token, add_special_tokens=False
            )
            # log-probs are unused by the plain RAFT loss this control trains with
            samples.append(
                Sample(i, prompt_ids, response_ids, text, [0.0] * len(response_ids), "stop")
            )
        return Rollouts(samples, np.ones(len(samples)), np.arange(len(samples)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-5, 1e-4, 5e-4])
    parser.add_argument("--minibatch", type=int, nargs="+", default=[8], help="prompts per step")
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--iterations", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=32, help="prompts per iteration")
    parser.add_argument("--eval-every", type=int, default=8)
    parser.add_argument("--eval-prompts", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output-dir", default="bench/results/controls")
    args = parser.parse_args()

    out = Path(args.output_dir)
    rows = []
    for lr in args.lr:
        for minibatch in args.minibatch:
            config = load_config(
                None,
                [
                    "algorithm=raft",
                    "allocation=uniform",
                    f"model={args.model}",
                    "train_data=builtin",
                    "eval_data=builtin",
                    f"iterations={args.iterations}",
                    f"prompts_per_iteration={args.prompts}",
                    f"optim.lr={lr}",
                    "update.minibatch_by=prompts",
                    f"update.minibatch_size={minibatch}",
                    f"eval.every={args.eval_every}",
                    f"eval.samples={args.eval_samples}",
                    f"data.eval_limit={args.eval_prompts}",
                    *QUIET,
                    *args.set,
                ],
            )
            run_dir = out / "runs" / f"lr{lr:g}-mb{minibatch}"
            ReferenceTrainer(config, run_dir).run()
            iterations, accuracy = eval_curve(load_run(run_dir), "iteration")
            row = {"lr": lr, "minibatch_prompts": minibatch}
            row.update({f"eval@{int(i)}": float(a) for i, a in zip(iterations, accuracy)})
            row["change"] = float(accuracy[-1] - accuracy[0])
            rows.append(row)
            print(f"lr {lr:g} mini-batch {minibatch}: {row}", file=sys.stderr)
    print(format_table(rows, list(rows[0])))
    command = "python bench/controls.py " + " ".join(sys.argv[1:])
    write_json(
        out / "results.json", json_ready({"command": command, "settings": vars(args), "runs": rows})
    )
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
