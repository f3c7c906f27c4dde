"""Does GVM's standing against uniform-n depend on the learning rate or the optimizer steps?

Variance reduction should matter most where the update is noisiest: a larger learning rate, or
more and smaller optimizer steps per iteration. This reads several `bench/convergence.py` output
directories that differ only in those settings (each must hold uniform-n and the compared arm)
and prints, per setting, each arm's change in held-out accuracy and the arm's paired difference
from uniform-n, side by side.

    python bench/settings.py bench/results/convergence-raftpp bench/results/convergence-lr2e-4 \
        bench/results/convergence-lr3e-4 bench/results/convergence-mb8 --arm gvm \
        --output bench/results/settings-builtin-raft++.json

Differences are in points; brackets hold the standard error over seeds. `re-eval` columns use
the 512 x K re-evaluations (--final-eval-samples), `mean 4-12` the runs' own evaluations after
the start.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gvmrl.io import json_ready, write_json
from gvmrl.progress import format_table


def setting_row(output_dir: Path, task: str, algorithm: str, arm: str) -> dict:
    results = json.loads((output_dir / "results.json").read_text())
    group = next(
        (g for g in results["groups"] if (g["task"], g["algorithm"]) == (task, algorithm)), None
    )
    if group is None:
        raise SystemExit(f"{output_dir / 'results.json'}: no {algorithm} run on {task}")
    rows = {r["arm"]: r for r in group["rows"]}
    if arm not in rows:
        raise SystemExit(f"{output_dir / 'results.json'}: no '{arm}' arm (has {', '.join(rows)})")
    uniform, other = rows["uniform-n"], rows[arm]

    def points(row: dict, key: str) -> float:  # absent without --final-eval-samples
        return 100 * row[key] if row.get(key) is not None else float("nan")

    return {
        "dir": str(output_dir),
        "lr": results["settings"]["lr"],
        "uniform_steps_per_iter": uniform["optimizer_steps_per_iter"],
        f"{arm}_steps_per_iter": other["optimizer_steps_per_iter"],
        "seeds": min(uniform["seeds"], other["seeds"]),
        "uniform_change": points(uniform, "accuracy_change"),
        "uniform_reeval_change": points(uniform, "reeval_change"),
        f"{arm}_change": points(other, "accuracy_change"),
        f"{arm}_reeval_change": points(other, "reeval_change"),
        "reeval_vs_uniform": points(other, "reeval_vs_uniform_n"),
        "reeval_vs_uniform_sem": points(other, "reeval_vs_uniform_n_sem"),
        "mean_eval_vs_uniform": points(other, "mean_eval_vs_uniform_n"),
        "mean_eval_vs_uniform_sem": points(other, "mean_eval_vs_uniform_n_sem"),
        "uniform_accepted_per_iter": uniform["accepted_samples_per_iter"],
        f"{arm}_accepted_per_iter": other["accepted_samples_per_iter"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dirs", nargs="+", type=Path, help="bench/convergence.py outputs")
    parser.add_argument("--arm", default="gvm", help="the arm compared with uniform-n")
    parser.add_argument("--task", default="builtin")
    parser.add_argument("--algorithm", default="raft++")
    parser.add_argument("--output", type=Path, help="JSON file for the rows")
    args = parser.parse_args()
    rows = [setting_row(d, args.task, args.algorithm, args.arm) for d in args.output_dirs]
    print(
        format_table(
            rows,
            [
                "lr",
                "uniform_steps_per_iter",
                f"{args.arm}_steps_per_iter",
                "seeds",
                "uniform_change",
                "uniform_reeval_change",
                f"{args.arm}_change",
                f"{args.arm}_reeval_change",
                "reeval_vs_uniform",
                "reeval_vs_uniform_sem",
                "mean_eval_vs_uniform",
                "mean_eval_vs_uniform_sem",
                "uniform_accepted_per_iter",
                f"{args.arm}_accepted_per_iter",
            ],
        )
    )
    if args.output:
        report = {"task": args.task, "algorithm": args.algorithm, "rows": rows}
        write_json(args.output, json_ready(report))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
