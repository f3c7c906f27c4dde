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
        help="override a config key, dotted for sections (e.g. --set allocation=gvm --set gvm.presamples=4)",
    )
    parser.add_argument(
        "--output-dir", required=True, help="run directory; an existing checkpoint there is resumed"
    )


def run(args: argparse.Namespace) -> int:
    from gvmrl.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"gvmrl train: {e}", file=sys.stderr)
        return 2

    from gvmrl.train import train

    try:
        metrics = train(config, args.output_dir)
    except ConfigError as e:
        print(f"gvmrl train: {e}", file=sys.stderr)
        return 2
    print(
        f"finished iteration {metrics.get('iteration', 0)}; outputs in {args.output_dir}",
        file=sys.stderr,
    )
    return 0
