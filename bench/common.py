"""Settings shared by the bench scripts: the arms of the convergence benchmark and of the
allocation-rule comparison (the package's named arms, `gvmrl.experiments.ARMS`, under the names
BENCHMARKS.md uses), the built-in tasks, and the overrides that keep bench runs quiet.

Bench scripts run as `python bench/NAME.py`, so they import this module as `common`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gvmrl.experiments import ARMS
from gvmrl.io import json_ready, write_json, write_text

# bench name -> package arm; every GVM arm's budget is fixed at 8 x prompts (`arm_overrides`)
BENCH_ARMS = {
    "uniform-n": "uniform",
    "uniform-2n": "uniform-2n",
    "gvm": "gvm",
    "gvm-reuse": "gvm-reuse",
    "gvm-incl-2": "gvm-incl-2",
    "gvm-incl-4": "gvm-incl-4",
}
# the allocation rules compared by bench/allocators.py, with uniform and GVM
RULE_ARMS = {
    "uniform-n": "uniform",
    "uniform-2n": "uniform-2n",
    "gvm": "gvm",
    "gvm-history": "gvm-history",
    "knapsack": "knapsack",
    "dapo": "dapo",
    "reinforce-ada": "reinforce-ada",
    "greso": "greso",
}
_ALL_ARMS = {**BENCH_ARMS, **RULE_ARMS}
# task -> (training prompts, held-out prompts)
TASKS = {
    "builtin": ("builtin:train", "builtin:test"),
    "builtin-hard": ("builtin-hard:train", "builtin-hard:test"),
}
QUIET = ["logging.progress=false", "logging.tensorboard=false"]


def is_gvm(arm: str) -> bool:
    return "allocation=gvm" in ARMS[_ALL_ARMS[arm]]


def arm_overrides(arm: str, prompts: int) -> list[str]:
    """The overrides of a bench arm: n = 8 samples per prompt for uniform-n, and a budget of
    8 x prompts for the GVM arms, as uniform-n generates."""
    overrides = list(ARMS[_ALL_ARMS[arm]])
    if is_gvm(arm):
        overrides.append(f"gvm.budget={8 * prompts}")
    return overrides


def write_results(out: Path, results: dict[str, Any], title: str, sections: list[str]) -> None:
    """A grid's results.json and its markdown tables (BENCHMARKS-section.md), atomically."""
    write_json(out / "results.json", json_ready(results))
    write_text(out / "BENCHMARKS-section.md", f"## {title}\n\n" + "\n".join(sections))
    print(f"wrote {out / 'results.json'} and {out / 'BENCHMARKS-section.md'}")
