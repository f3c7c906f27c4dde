"""Which allocation rule beats the best uniform arm per generated sample?

Every allocation rule on one loop, compared at equal generated samples: uniform-n, uniform-2n,
GVM (the paper's, N' = 8 pre-samples), gvm-history, knapsack, dapo, reinforce-ada and greso
(README: Allocation rules), each with its config section's defaults. The prompt set is finite so
that prompts recur, as several rules need: the first 256 built-in training prompts
(`data.train_limit`), 32 per iteration in 4 optimizer steps, 24 iterations (3 epochs). Within a
seed every rule sees the same prompt stream, starts from the same checkpoint and is evaluated on
the same 512 held-out prompts x 4 samples every 8 iterations. pi_old is the rollout's log-prob
(`loss.old_logprobs=rollout`): the HF engine computes it with the training model in float32, so
it equals the recomputed one up to round-off (tests/test_train_wiring.py), and the grid saves a
forward pass per update. GRPO runs every rule; RAFT++ the rules that apply to it (uniform, gvm,
gvm-history): the others aim at GRPO's zero advantage in groups whose rewards are all equal,
while RAFT++ learns from an all-correct group too. Every generated sample is counted
(pre-samples, dropped groups, extra rounds: `samples_generated`).

Per rule and algorithm it reports: held-out accuracy against generated samples (curves with
min-max seed bands, OUT/curves-<algorithm>.png); generated samples to reach uniform-n's final
accuracy (read off fitted curves as in bench/convergence.py) and how many times fewer that is
than uniform-n's; accuracy at equal generated samples, paired by seed against uniform-n and
uniform-2n (both runs read at the smaller of their final sample counts, standard error over
seeds); the share of trained samples with zero advantage and of generated groups whose rewards
were all equal; and the time the rule itself costs (its statistics and history: time_stats +
time_history per iteration). The goal: a rule that reaches uniform-n's final accuracy
with at least 1.5x fewer generated samples and is ahead of uniform-2n at equal generation by
more than two standard errors; the table says which rule, if any, gets there.

    python bench/allocators.py                                   # the full grid (hours of CPU)
    python bench/allocators.py --rules uniform-n dapo --seeds 0 1  # a piece of it
    python bench/allocators.py --quick                           # smoke: 1 seed, 2 rules, 2 iters
    python bench/allocators.py --report                          # summarise the finished runs

Runs are resumable: a rerun skips finished runs and resumes unfinished ones, so the grid can run
in pieces (--rules, --seeds, --algorithms); the summary covers every finished run in OUT.
Several processes may share one OUT (e.g. one per core, each with `--set threads=1`): each
claims a run before training it and skips runs that another live process holds.
Writes OUT/results.json, OUT/curves-<algorithm>.png and OUT/BENCHMARKS-section.md.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np

from gvmrl.analysis import eval_curve, load_run, paired_difference, plot_curves
from gvmrl.train import train

from common import RULE_ARMS, write_results
from convergence import _mean, run_config, summarise

# The rules each algorithm runs (see the docstring for why RAFT++ runs fewer).
RULES_FOR = {
    "grpo": list(RULE_ARMS),
    "raft++": ["uniform-n", "uniform-2n", "gvm", "gvm-history"],
}
BASELINES = ("uniform-n", "uniform-2n")
NO_TARGET = (
    " uniform-n ends no higher than it started, so samples to reach its final accuracy are not"
    " defined: the equal-generation columns carry the comparison."
)
CLAIM = "claimed-by"  # in a run's directory: "HOST PID" of the grid process training it
GOAL_SPEEDUP = 1.5  # times fewer generated samples than uniform-n to its final accuracy
TASK = "builtin"


def rule_config(args, algorithm: str, rule: str, seed: int):
    """bench/convergence.py's run on the finite prompt set; GVM's rule on history keeps GRPO
    groups of two samples or more, as convergence.py does for GVM."""
    extra = [f"data.train_limit={args.train_prompts}", "loss.old_logprobs=rollout"]
    if algorithm == "grpo" and rule == "gvm-history":
        extra.append("gvm.min_size=2")
    run_args = copy.copy(args)
    run_args.set = [*extra, *args.set]
    return run_config(run_args, TASK, algorithm, rule, seed)


def run_dir(out: Path, algorithm: str, rule: str, seed: int) -> Path:
    return out / "runs" / algorithm / rule / f"seed{seed}"


def finished_run(path: Path, iterations: int) -> list[dict] | None:
    """The run's metrics if it trained all `iterations`, else None."""
    if not (path / "metrics.jsonl").exists():
        return None
    rows = load_run(path)
    return rows if rows and rows[-1]["iteration"] == iterations else None


def claim(path: Path) -> bool:
    """Mark the run as this process's, so that several grid processes (one per core) can share
    one OUT: False when another live process on this host holds it. A claim left by a killed
    process is taken over."""
    path.mkdir(parents=True, exist_ok=True)
    marker = path / CLAIM
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            host, _, pid = marker.read_text().partition(" ")
            if host != socket.gethostname() or _alive(int(pid)):
                return False
            marker.unlink(missing_ok=True)  # its process died: take the run over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return True


def run_grid(args, out: Path) -> None:
    jobs = [
        (algorithm, rule, seed)
        for algorithm in args.algorithms
        for rule in args.rules
        if rule in RULES_FOR[algorithm]
        for seed in args.seeds
    ]
    spent, trained = 0.0, 0
    for k, (algorithm, rule, seed) in enumerate(jobs, 1):
        path = run_dir(out, algorithm, rule, seed)
        label = f"[{k}/{len(jobs)}] {algorithm} {rule} seed {seed}"
        if finished_run(path, args.iterations) is not None:
            print(f"{label}: finished earlier", file=sys.stderr)
            continue
        if not claim(path):
            print(f"{label}: another process is training it", file=sys.stderr)
            continue
        started = time.perf_counter()
        try:
            train(rule_config(args, algorithm, rule, seed), path)
        finally:
            (path / CLAIM).unlink(missing_ok=True)
        spent += time.perf_counter() - started
        trained += 1
        left = sum(
            finished_run(run_dir(out, *job), args.iterations) is None for job in jobs[k:]
        )
        print(
            f"{label}: {time.perf_counter() - started:.0f}s; {left} runs left, about "
            f"{left * spent / trained / 60:.0f} min at this pace",
            file=sys.stderr,
        )


def collect(out: Path, algorithm: str, iterations: int) -> dict[str, dict[int, list[dict]]]:
    """Every finished run of `algorithm` in OUT: rule -> seed -> metrics rows."""
    runs: dict[str, dict[int, list[dict]]] = {}
    for rule in RULES_FOR[algorithm]:
        for path in sorted((out / "runs" / algorithm / rule).glob("seed*")):
            rows = finished_run(path, iterations)
            if rows is not None:
                runs.setdefault(rule, {})[int(path.name.removeprefix("seed"))] = rows
    return runs


def accuracy_at_equal_samples(run: list[dict], baseline: list[dict]) -> tuple[float, float]:
    """(run's, baseline's) held-out accuracy at the smaller of their final generated-sample
    counts, each read off its own accuracy-vs-samples curve (linear between evaluations)."""
    curves = [eval_curve(m, "samples_generated") for m in (run, baseline)]
    budget = min(c[0][-1] for c in curves)
    a, b = (float(np.interp(budget, xs, ys)) for xs, ys in curves)
    return a, b


def rule_rows(runs: dict[str, dict[int, list[dict]]]) -> tuple[float, list[dict]]:
    """bench/convergence.py's summary (target = uniform-n's fitted final accuracy, samples to
    it, zero-advantage share, ...) on the seeds uniform-n finished, plus the comparisons at
    equal generation, the zero-variance share of generated groups and the rule's own time."""
    seeds = sorted(runs["uniform-n"])
    ordered = {
        rule: [by_seed[s] for s in seeds if s in by_seed] for rule, by_seed in runs.items()
    }
    ordered = {"uniform-n": ordered.pop("uniform-n"), **ordered}
    target, rows = summarise(ordered)
    if not has_target(target, rows):  # every run "reaches" a target at or below the start
        for row in rows:
            row["samples_to_target_of_mean"] = row["samples_speedup"] = math.nan
    for row in rows:
        rule = row["arm"]
        iters = [r for s in seeds if s in runs[rule] for r in runs[rule][s] if r["iteration"] > 0]
        for baseline in BASELINES:
            pairs = [
                accuracy_at_equal_samples(runs[rule][s], runs[baseline][s])
                for s in seeds
                if s in runs[rule] and s in runs.get(baseline, {})
            ]
            key = f"equal_samples_vs_{baseline.replace('-', '_')}"
            if pairs:
                diff, sem = paired_difference(*zip(*pairs))
            else:
                diff, sem = math.nan, math.nan
            row[key], row[f"{key}_sem"], row[f"{key}_seeds"] = diff, sem, len(pairs)
        row["generated_zero_variance_share"] = _mean(iters, "zero_variance_share")
        row["discarded_per_iter"] = _mean(iters, "discarded_samples")
        row["shortfall_per_iter"] = _mean(iters, "budget_shortfall")
        own = [r.get("time_stats", 0.0) + r.get("time_history", 0.0) for r in iters]
        phases = [
            sum(v for k, v in r.items() if k.startswith("time_") and k != "time_eval")
            for r in iters
        ]
        row["rule_seconds_per_iter"] = float(np.mean(own)) if own else math.nan
        row["rule_time_share"] = sum(own) / sum(phases) if sum(phases) else 0.0
        ahead = row["equal_samples_vs_uniform_2n"] - 2 * row["equal_samples_vs_uniform_2n_sem"]
        row["meets_goal"] = bool(row["samples_speedup"] >= GOAL_SPEEDUP and ahead > 0)
    return target, rows


def has_target(target: float, rows: list[dict]) -> bool:
    """Whether uniform-n's fitted final accuracy lies above its start (rows[0] is uniform-n):
    otherwise samples to reach it are not defined."""
    return target > rows[0]["start_eval_accuracy"]


def markdown_section(algorithm: str, target: float, rows: list[dict], command: str) -> str:
    uniform = rows[0]
    defined = has_target(target, rows)
    iterations = [int(i) for i in uniform["eval_iterations"]]
    header = [
        "rule",
        "seeds",
        f"eval @{'/'.join(map(str, iterations))} (seed mean)",
        "generated / iter",
        "samples to target (x fewer than uniform-n)",
        "vs uniform-n at equal samples",
        "vs uniform-2n at equal samples",
        "zero-advantage share (trained)",
        "all-equal groups (generated)",
        "rule time / iter (share)",
        "goal",
    ]
    lines = []
    for row in rows:
        samples = row["samples_to_target_of_mean"]
        lines.append(
            [
                row["arm"],
                str(row["seeds"]),
                " ".join(f"{a:.3f}".lstrip("0") for a in row["eval_accuracy_mean"]),
                f"{row['generated_per_iter']:.0f}",
                f"{samples:.0f} ({row['samples_speedup']:.2f}x)"
                if math.isfinite(samples)
                else ("not reached" if defined else "-"),
                _points(row, "equal_samples_vs_uniform_n"),
                _points(row, "equal_samples_vs_uniform_2n"),
                _share(row["zero_advantage_share"]),
                _share(row["generated_zero_variance_share"]),
                f"{row['rule_seconds_per_iter']:.2f}s ({row['rule_time_share']:.0%})",
                "yes" if row["meets_goal"] else "no",
            ]
        )
    table = "\n".join(
        "| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *lines]
    )
    winners = [r["arm"] for r in rows if r["meets_goal"]]
    verdict = (
        f"Meets the goal: {', '.join(winners)}."
        if winners
        else "No rule meets the goal (>= 1.5x fewer generated samples than uniform-n to its "
        "final accuracy, and ahead of uniform-2n at equal generation by more than two standard "
        "errors)."
    )
    return (
        f"### {algorithm}: allocation rules at equal generation ({uniform['seeds']} seeds)\n\n"
        f"    {command}\n\n"
        f"Start {uniform['start_eval_accuracy']:.3f}, target {target:.3f} (uniform-n's fitted "
        "final accuracy). Differences in points, standard error over seeds in brackets; "
        "equal samples: both runs read at the smaller of their final generated counts."
        f"{'' if defined else NO_TARGET}\n\n{table}\n\n{verdict}\n"
    )


def _points(row: dict, key: str) -> str:
    value, sem = row[key], row[f"{key}_sem"]
    if not math.isfinite(value):
        return "-"
    text = f"{100 * value:+.1f}"
    return text if not math.isfinite(sem) else f"{text} ({100 * sem:.1f})"


def _share(value: float) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(5)))
    parser.add_argument("--rules", nargs="+", default=list(RULE_ARMS), choices=list(RULE_ARMS))
    parser.add_argument(
        "--algorithms", nargs="+", default=["grpo", "raft++"], choices=list(RULES_FOR)
    )
    parser.add_argument("--iterations", type=int, default=24)
    parser.add_argument("--prompts", type=int, default=32, help="prompts per iteration")
    parser.add_argument(
        "--train-prompts", type=int, default=256, help="size of the finite training set"
    )
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-every", type=int, default=8)
    parser.add_argument("--eval-prompts", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run"
    )
    parser.add_argument(
        "--output-dir", help="default bench/results/allocators (--quick: allocators-quick)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 seed, uniform-n and dapo under GRPO, 2 iterations of 8 prompts",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="only summarise the runs finished in OUT (e.g. while grid processes still run)",
    )
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.rules, args.algorithms = [0], ["uniform-n", "dapo"], ["grpo"]
        args.iterations, args.prompts, args.train_prompts = 2, 8, 16
        args.eval_every, args.eval_prompts = 1, 16
    out = Path(
        args.output_dir or f"bench/results/allocators{'-quick' if args.quick else ''}"
    )
    if not args.report:
        run_grid(args, out)

    shown = [a for a in sys.argv[1:] if a != "--report"]  # the command that trains the grid
    command = " ".join(["python bench/allocators.py", *shown])
    results: dict = {"settings": vars(args), "groups": []}
    sections = []
    for algorithm in args.algorithms:
        runs = collect(out, algorithm, args.iterations)
        if "uniform-n" not in runs:
            print(f"{algorithm}: no finished uniform-n run yet; no summary", file=sys.stderr)
            continue
        target, rows = rule_rows(runs)
        plot_curves(
            {rule: [runs[rule][s] for s in sorted(runs[rule])] for rule in runs},
            out / f"curves-{algorithm}.png",
            target=target,
            title=f"{algorithm}: allocation rules, seed mean, band = min..max",
        )
        results["groups"].append(
            {"algorithm": algorithm, "target_accuracy": target, "rows": rows}
        )
        sections.append(markdown_section(algorithm, target, rows, command))
        print(sections[-1])
    write_results(out, results, "Allocation rules at equal generation", sections)


if __name__ == "__main__":
    main()
