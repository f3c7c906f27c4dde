"""The `gvmrl` command: one sub-command per module under `gvmrl.commands`.

Each command module defines `add_arguments(parser)` and `run(args) -> int` and imports heavy
libraries (torch, transformers) inside `run`, so `gvmrl --help` and `gvmrl allocate` start fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gvmrl.io import InputError

# name -> (module under gvmrl.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "train uniform vs GVM allocation on the built-in task and compare them"),
    "train": ("train", "run the GVM-EM loop (RAFT, RAFT++ or GRPO; uniform or GVM allocation)"),
    "allocate": ("allocate", "turn per-prompt stats into per-prompt sample counts"),
    "stats": ("stats", "per-prompt accept rates and gradient norms from scored samples"),
    "score": ("score", "grade responses against reference answers"),
    "eval": ("evaluate", "accuracy and pass@k of a model on prompt files"),
    "pretrain": ("pretrain", "supervised warm start of the built-in tiny model"),
    "data": ("data", "prepare prompt files from MATH/GSM8K/NuminaMath/OlympiadBench data"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gvmrl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(f"gvmrl.commands.{module_name}")
        except ModuleNotFoundError as e:
            if e.name != f"gvmrl.commands.{module_name}":
                raise
            continue  # command not built yet
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except InputError as e:
        print(e, file=sys.stderr)  # already `FILE:LINE: message`, the form editors jump to
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
