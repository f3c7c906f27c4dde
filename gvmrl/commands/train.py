"""`gvmrl train`: run or resume the GVM-EM loop from a YAML config and `--set` overrides."""

from __future__ import annotations

import argparse
import sys

from gvmrl.config import add_override_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="YAML config (see configs/); defaults apply to missing keys"
    )
    add_override_argument(
        parser,
        help="override a config key, dotted for sections "
        "(e.g. --set allocation=gvm --set gvm.presamples=4)",
    )
    parser.add_argument(
        "--output-dir", required=True, help="run directory; an existing checkpoint there is resumed"
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="start over: delete the run's checkpoints, final weights and metrics first (without "
        "it, a directory with metrics but no usable checkpoint is refused)",
    )


def run(args: argparse.Namespace) -> int:
    from gvmrl.checkpoint import clear_run
    from gvmrl.config import load_config
    from gvmrl.distributed.context import launch_environment
    from gvmrl.io import check_output_dir

    config = load_config(args.config, args.overrides)  # ConfigError: one line, exit 2 (gvmrl.cli)
    check_output_dir(args.output_dir)
    launch = launch_environment()  # None: one process; else this rank of a torchrun job
    main = launch is None or launch[0] == 0
    if args.restart and main:  # the other ranks wait for rank 0 to look for a checkpoint
        clear_run(args.output_dir)

    from gvmrl.train import train

    metrics = train(config, args.output_dir)
    if "iteration" in metrics:
        done = f"finished iteration {metrics['iteration']}"
    else:  # nothing was left to train
        done = f"nothing to train: the run already finished its {config.iterations} iterations"
    if main:
        print(f"{done}; outputs in {args.output_dir}", file=sys.stderr)
    return 0
