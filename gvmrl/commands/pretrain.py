"""`gvmrl pretrain`: supervised warm start of the built-in tiny model (a few CPU minutes).

The result is a normal Hugging Face checkpoint directory in `--output`: train from it with
`model: DIR` (`--set model=DIR`), evaluate it with `gvmrl eval --model DIR`. `model: builtin` stays
the checkpoint shipped with the package (built by this command with its defaults).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output",
        type=Path,
        required=True,
        help="checkpoint directory to write; use it with `--set model=DIR` (gvmrl train, demo) "
        "or `--model DIR` (gvmrl eval); `model: builtin` stays the shipped checkpoint",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="optimizer steps (default: gvmrl.builtin.pretrain.DEFAULT_STEPS, calibrated)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per optimizer step")
    parser.add_argument(
        "--lr", type=float, default=3e-3, help="peak learning rate (AdamW, cosine decay)"
    )
    parser.add_argument(
        "--min-lr-ratio",
        type=float,
        help="the cosine decays to this share of --lr "
        "(default: gvmrl.builtin.pretrain.MIN_LR_RATIO; 0 anneals fully, which leaves a poor "
        "warm start for RL, see BENCHMARKS.md)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of initialisation and batch order"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from gvmrl.builtin.pretrain import DEFAULT_STEPS, MIN_LR_RATIO, pretrain
    from gvmrl.io import InputError

    steps = DEFAULT_STEPS if args.steps is None else args.steps
    for flag, value in (("--steps", steps), ("--batch-size", args.batch_size)):
        if value < 1:
            raise InputError(flag, None, "must be >= 1")
    if args.min_lr_ratio is not None and not 0 <= args.min_lr_ratio <= 1:
        raise InputError("--min-lr-ratio", None, "must be in [0, 1]")
    metrics = pretrain(
        args.output,
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        min_lr_ratio=MIN_LR_RATIO if args.min_lr_ratio is None else args.min_lr_ratio,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(json.dumps(metrics, indent=2))
    print(f"saved checkpoint to {args.output}; train from it with --set model={args.output}")
    return 0
