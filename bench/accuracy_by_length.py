"""Where does training move held-out accuracy? Start vs final, split by chain length.

Reads the 512 x K re-evaluations that `bench/convergence.py --final-eval-samples K` saved (the
start's per seed, each arm's final weights per seed) and prints, paired by seed, the change in
final-answer accuracy, in strict accuracy (right answer and every stated equation true: the
`answer+arithmetic` training reward) and in accuracy per number of operations in the chain.

    python bench/accuracy_by_length.py bench/results/convergence-hard builtin-hard raft++

Writes OUTPUT_DIR/accuracy-by-length-<task>-<algorithm>.json.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from gvmrl.data import load_prompts
from gvmrl.io import json_ready, write_json
from gvmrl.rewards import stated_arithmetic_holds

OPERATION = re.compile(r"[-+*]")


def accuracies(rows_file: Path, lengths: dict[str, int]) -> dict:
    """Answer accuracy, strict accuracy and accuracy per chain length of one saved evaluation."""
    answer, strict, by_length = [], [], defaultdict(list)
    for line in rows_file.read_text().splitlines():
        row = json.loads(line)
        for score, response in zip(row["scores"], row["responses"]):
            answer.append(score > 0)
            strict.append(score > 0 and stated_arithmetic_holds(response))
            by_length[lengths[row["id"]]].append(score > 0)
    return {
        "answer": np.mean(answer),
        "strict": np.mean(strict),
        **{n: np.mean(v) for n, v in by_length.items()},
    }


def per_seed(pattern: str, root: Path, lengths: dict[str, int]) -> dict[int, dict]:
    found = {}
    for rows_file in root.glob(pattern):
        seed = int(re.search(r"seed(\d+)", str(rows_file.relative_to(root))).group(1))
        found[seed] = accuracies(rows_file, lengths)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="a bench/convergence.py --output-dir")
    parser.add_argument("task", help="builtin or builtin-hard")
    parser.add_argument("algorithm", help="raft++, grpo, ...")
    args = parser.parse_args()
    lengths = {
        r.id: len(OPERATION.findall(r.problem))
        for r in load_prompts(f"{args.task}:test", split="test")
    }
    root = args.output_dir / "runs" / args.task
    start = per_seed("start-eval-seed*/results.*.jsonl", root, lengths)
    if not start:
        raise SystemExit(f"no start re-evaluations under {root} (run with --final-eval-samples)")
    keys = [
        "answer",
        "strict",
        *sorted(k for k in next(iter(start.values())) if isinstance(k, int)),
    ]
    report = {
        "start": {str(k): np.mean([s[k] for s in start.values()]) for k in keys},
        "change": {},
    }
    print(f"{'':12s} {'seeds':9s}", " ".join(f"{k!s:>7s}" for k in keys))
    print(
        f"{'start':12s} {'':9s}",
        " ".join(f"{v:7.3f}" for v in report["start"].values()),
    )
    for arm_dir in sorted(p for p in (root / args.algorithm).iterdir() if p.is_dir()):
        final = per_seed("seed*/final-eval/results.*.jsonl", arm_dir, lengths)
        seeds = sorted(set(final) & set(start))
        if not seeds:
            continue
        change = [np.mean([100 * (final[s][k] - start[s][k]) for s in seeds]) for k in keys]
        report["change"][arm_dir.name] = {"seeds": seeds, **dict(zip(map(str, keys), change))}
        print(
            f"{arm_dir.name:12s} {','.join(map(str, seeds)):9s}",
            " ".join(f"{c:+7.1f}" for c in change),
        )
    print("(start: accuracies; arms: change from the start in points, mean over the seeds listed)")
    output = args.output_dir / f"accuracy-by-length-{args.task}-{args.algorithm}.json"
    write_json(output, json_ready(report))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
