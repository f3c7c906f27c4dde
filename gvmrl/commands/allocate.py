"""`gvmrl allocate`: per-prompt stats (JSONL) in, per-prompt sample counts (JSON list) out.

The output is a JSON list of ints in row order, the format the reference GVM pipeline's trainer
reads, so this command can drive that pipeline as well as ours.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings

import numpy as np

from gvmrl.allocation import WEIGHT_RULES, allocate
from gvmrl.io import InputError, check_output_path, read_jsonl, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stats", required=True, help="JSONL with `accept_rate` and `grad_norm` per prompt"
    )
    parser.add_argument("--budget", required=True, type=int, help="total samples N to allocate")
    parser.add_argument("--rule", default="gvm", choices=sorted(WEIGHT_RULES))
    parser.add_argument("--alpha", type=float, default=1e-3, help="GVM regulariser weight")
    parser.add_argument("--beta", type=float, default=2.0, help="GVM regulariser exponent")
    parser.add_argument(
        "--min-size", type=int, default=0, help="floor for prompts that get samples"
    )
    parser.add_argument("--max-size", type=int, default=None, help="cap per prompt")
    parser.add_argument(
        "--drop-above", type=float, default=None, help="give 0 to prompts with p > this"
    )
    parser.add_argument(
        "--min-expected-accepts",
        type=float,
        default=None,
        help="give 0 to prompts expecting fewer accepts",
    )
    parser.add_argument(
        "--uniform-share",
        type=float,
        default=0.0,
        help="share of the budget spread evenly over the prompts (defensive mixture)",
    )
    parser.add_argument("--output", required=True, help="SIZES.json, or - for stdout")


def read_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Accept rates and gradient norms of every row, each checked where it stands in the file."""
    accept_rates, grad_norms = [], []
    for line, row in read_jsonl(path):
        accept_rates.append(_number(row, "accept_rate", path, line, 0.0, 1.0, "in [0, 1]"))
        grad_norms.append(_number(row, "grad_norm", path, line, 0.0, math.inf, "finite and >= 0"))
    if not accept_rates:
        raise InputError(path, None, "no rows (expected one JSON object per prompt)")
    return np.array(accept_rates, dtype=np.float64), np.array(grad_norms, dtype=np.float64)


def _number(
    row: dict, field: str, path: str, line: int, low: float, high: float, rule: str
) -> float:
    if field not in row:
        raise InputError(path, line, f"{field} missing")
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(path, line, f"{field} must be a number, got {value!r}")
    if not (low <= value <= high) or math.isinf(value):
        raise InputError(path, line, f"{field} = {value}: must be {rule}")
    return float(value)


def run(args: argparse.Namespace) -> int:
    if args.output != "-":
        check_output_path(args.output)
    accept_rates, grad_norms = read_stats(args.stats)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sizes = allocate(
                accept_rates,
                grad_norms,
                args.budget,
                rule=args.rule,
                alpha=args.alpha,
                beta=args.beta,
                min_size=args.min_size,
                max_size=args.max_size,
                drop_above=args.drop_above,
                min_expected_accepts=args.min_expected_accepts,
                uniform_share=args.uniform_share,
            )
    except ValueError as e:
        print(f"gvmrl allocate: {e}", file=sys.stderr)
        return 2
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)

    out = [int(n) for n in sizes]
    if args.output == "-":
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    else:
        write_json(args.output, out, indent=None)
    print(
        f"allocated {int(sizes.sum())}/{args.budget} samples over {len(out)} prompts "
        f"({args.rule}); zero-allocated prompts: {int((sizes == 0).sum())}; "
        f"max size: {int(sizes.max()) if len(out) else 0}",
        file=sys.stderr,
    )
    return 0
