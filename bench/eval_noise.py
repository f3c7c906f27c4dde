"""How far does re-evaluating the same weights move held-out accuracy?

The issue asks for an evaluation whose repeat moves accuracy by under a point. Training runs are
reproducible (same seed, same samples, same updates; evaluations draw from their own generator),
so a rerun of a `bench/convergence.py` grid with larger in-run evaluations ends on the same
weights as the first grid. Its in-run evaluation of the final weights and the first grid's
`--final-eval-samples` re-evaluation are then two independent evaluations of identical weights,
and so are the two grids' evaluations of the start. This pairs them (final weights only where
the two checkpoints are byte-identical) and reports:

- the standard deviation of the difference between the two evaluations (how far a re-evaluation
  moves accuracy) and of one evaluation (that divided by sqrt(2) when both have the same size);
- the same per-evaluation figure estimated inside single evaluations from the per-prompt
  spread of the re-evaluations' scores, which needs no second evaluation.

    python bench/eval_noise.py bench/results/convergence-raftpp \
        bench/results/convergence-raftpp-512x4

Writes RERUN_DIR/eval-noise.json. Figures in points of accuracy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path

import numpy as np

from gvmrl.analysis import eval_curve, load_run
from gvmrl.config import load_config
from gvmrl.io import json_ready, write_json


def saved_evaluation(results_file: Path) -> dict:
    """Accuracy, responses per prompt and per-prompt standard error of one `gvmrl eval` output."""
    saved = json.loads(results_file.read_text())
    (result,) = saved["results"].values()
    return {
        "accuracy": float(result["accuracy"]),
        "samples": int(saved["samples"]),
        "within_sd": within_evaluation_sd(results_file.parent / result["rows_file"]),
    }


def within_evaluation_sd(rows_file: Path) -> float:
    """Standard error of an evaluation's accuracy from the per-prompt spread of its scores (the
    prompts are fixed; only the sampled responses vary between evaluations)."""
    variances, prompts = 0.0, 0
    for line in rows_file.read_text().splitlines():
        scores = np.array(json.loads(line)["scores"], dtype=np.float64)
        variances += scores.var(ddof=1) / scores.size
        prompts += 1
    return math.sqrt(variances) / prompts


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pairs(first: Path, rerun: Path) -> list[dict]:
    """(re-evaluation in `first`, in-run evaluation in `rerun`) of the same weights."""
    found = []
    for metrics in sorted(rerun.glob("runs/*/*/*/seed*/metrics.jsonl")):
        run = metrics.parent
        twin = first / run.relative_to(rerun)
        reeval = twin / "final-eval" / "results.json"
        if not (run / "final").is_dir():
            continue  # unfinished
        task, algorithm, arm, seed = run.relative_to(rerun).parts[1:]
        rerun_samples = load_config(run / "config.yaml").eval.samples
        _, accuracy = eval_curve(load_run(run), "iteration")
        start = first / "runs" / task / f"start-eval-seed{seed.removeprefix('seed')}"
        candidates = [("final", reeval, float(accuracy[-1]))]
        if arm == "uniform-n":  # every arm of a seed starts from the same weights: one pair
            candidates.append(("start", start / "results.json", float(accuracy[0])))
        for weights, results_file, rerun_accuracy in candidates:
            if not results_file.exists():
                continue
            if weights == "final" and digest(run / "final" / "model.safetensors") != digest(
                twin / "final" / "model.safetensors"
            ):
                continue  # float round-off made the two runs' weights drift apart
            saved = saved_evaluation(results_file)
            if saved["samples"] != rerun_samples:
                raise SystemExit(
                    f"{results_file}: {saved['samples']} samples per prompt, but {run} "
                    f"evaluates {rerun_samples}; the pairs must be of equal size"
                )
            found.append(
                {
                    "task": task,
                    "algorithm": algorithm,
                    "arm": arm,
                    "seed": seed,
                    "weights": weights,
                    "first": saved["accuracy"],
                    "rerun": rerun_accuracy,
                    "within_sd": saved["within_sd"],
                }
            )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path, help="grid run with --final-eval-samples")
    parser.add_argument(
        "rerun",
        type=Path,
        help="the same grid rerun with in-run evaluations of the re-evaluations' size",
    )
    args = parser.parse_args()
    found = pairs(args.first, args.rerun)
    if len(found) < 2:
        raise SystemExit(f"{args.rerun}: fewer than two evaluations pair with {args.first}")
    difference = np.array([p["rerun"] - p["first"] for p in found])
    summary = {
        "pairs": len(found),
        "final_weight_pairs": sum(p["weights"] == "final" for p in found),
        "mean_difference_points": 100 * difference.mean(),
        "difference_sd_points": 100 * difference.std(ddof=1),
        "one_evaluation_sd_points": 100 * difference.std(ddof=1) / math.sqrt(2),
        "within_evaluation_sd_points": 100 * float(np.mean([p["within_sd"] for p in found])),
    }
    print(
        f"{summary['pairs']} pairs of evaluations of identical weights "
        f"({summary['final_weight_pairs']} final, the rest starts)\n"
        f"re-evaluation moves accuracy by {summary['difference_sd_points']:.2f} points (sd of the "
        f"difference; mean {summary['mean_difference_points']:+.2f})\n"
        f"one evaluation: sd {summary['one_evaluation_sd_points']:.2f} points from the pairs, "
        f"{summary['within_evaluation_sd_points']:.2f} from the per-prompt spread"
    )
    write_json(args.rerun / "eval-noise.json", json_ready({**summary, "evaluations": found}))


if __name__ == "__main__":
    main()
