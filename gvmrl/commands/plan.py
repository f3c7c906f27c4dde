"""`gvmrl plan`: the estimated GPU memory of a training config, part by part (gvmrl.memory).

Reads only the config and the model's config.json (shipped for the paper's models), loads no
weights and needs no GPU or vLLM. Exit status 2 when the config cannot fit, with the message the
trainer would stop with.
"""

from __future__ import annotations

import argparse
import sys

from gvmrl.config import add_override_argument, load_config
from gvmrl.io import write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training config YAML")
    parser.add_argument(
        "--gpu-memory-gib", type=float, default=141.0, help="GPU memory in GiB (H200: 141)"
    )
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    add_override_argument(parser, "override a config key, e.g. gradient_checkpointing=true")


def run(args: argparse.Namespace) -> int:
    from gvmrl.memory import format_plan, plan_dict, plan_fits, plan_memory

    config = load_config(args.config, args.overrides, check_environment=False)
    plan = plan_memory(config, args.gpu_memory_gib)
    print(format_plan(plan))
    if args.json:
        write_json(args.json, plan_dict(plan))
    plan_fits(config, args.gpu_memory_gib)  # ConfigError -> one line, exit status 2
    print(f"fits: peak {max(plan.update_peak, plan.rollout_peak) / 2**30:.1f} GiB", file=sys.stderr)
    return 0
