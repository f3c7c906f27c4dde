"""The `gvmrl` command: one sub-command per module under `gvmrl.commands`.

Each command module defines `add_arguments(parser)` and `run(args) -> int` and imports heavy
libraries (torch, transformers) inside `run`, so `gvmrl --help` and `gvmrl allocate` start fast.

All commands share one error path (`main`): a user error (bad input file or row, bad path, full
disk, bad config value, a run that diverged) prints one line and exits 2; anything else is an
internal error and keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gvmrl.config import ConfigError
from gvmrl.guards import NonFiniteError
from gvmrl.io import USER_ERRNOS, InputError, disk_full

# name -> (module under gvmrl.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "train uniform vs GVM allocation on the built-in task and compare them"),
    "train": ("train", "run the GVM-EM loop (RAFT, RAFT++ or GRPO; uniform or GVM allocation)"),
    "allocate": ("allocate", "turn per-prompt stats into per-prompt sample counts"),
    "stats": ("stats", "per-prompt accept rates and gradient norms from scored samples"),
    "score": ("score", "grade responses against reference answers"),
    "eval": ("evaluate", "accuracy and pass@k of a model on prompt files"),
    "pretrain": ("pretrain", "rebuild the built-in tiny model's warm start into a directory"),
    "data": ("data", "prepare prompt files from MATH/GSM8K/NuminaMath/OlympiadBench data"),
    "plan": ("plan", "estimate a training config's GPU memory, part by part"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gvmrl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"gvmrl.commands.{module_name}")
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except InputError as e:
        _say(e)  # already `FILE:LINE: message`, the form editors jump to
        return 2
    except (ConfigError, NonFiniteError) as e:
        _say(f"gvmrl {args.command}: {e}")  # ConfigError starts with its key
        return 2
    except OSError as e:
        if e.errno not in USER_ERRNOS:
            raise
        reason = "no space left on device" if disk_full(e) else e.strerror
        where = f"{e.filename}: " if e.filename else ""
        _say(f"gvmrl {args.command}: {where}{reason}")
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _say(message: object) -> None:
    """Print a user error as the one line it must be (values quoted from input may hold breaks)."""
    print(" ".join(str(message).split()), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
