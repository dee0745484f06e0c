"""`attnrl` command line: generate | signals | train | eval | merge | analyze | fidelity | ablate.

Each subcommand lives in the module that implements it; that module provides
`add_arguments(parser)` and `run(args) -> int`. Modules are imported lazily so that
`attnrl merge` never pays for importing vLLM.
"""

import argparse
import importlib
import sys

from attnrl import __version__, quiet
from attnrl.errors import UserError

SUBCOMMANDS = {
    "generate": ("attnrl.rollout.cli", "sample completions for a task with a rollout engine"),
    "signals": ("attnrl.signals.cli", "show WAAD / FAI / preplan / anchor tokens of a response"),
    "train": ("trainers.cli", "run a GRPO / NSR training job from a YAML config"),
    "eval": ("attnrl.evaluation", "pass@k of one or more checkpoints on a task"),
    "merge": ("attnrl.merge", "reasoning-vector task arithmetic over safetensors checkpoints"),
    "analyze": ("attnrl.analysis.cli", "does a model show the preplan-and-anchor rhythm; "
                                       "do its QK heads predict correctness"),
    "fidelity": ("attnrl.fidelity.cli", "is each credit strategy's per-token credit where the "
                                        "outcome is decided (Monte-Carlo values)"),
    "ablate": ("trainers.ablation", "credit-strategy ablation: strategies x seeds, held-out table"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="attnrl", description=__doc__.splitlines()[0])
    parser.add_argument("-V", "--version", action="version", version=f"attnrl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"attnrl {__version__}")
        return 0
    name = argv[0]
    if name not in SUBCOMMANDS:
        parser.error(f"unknown command {name!r}; choose from {', '.join(SUBCOMMANDS)}")
    module_name, help_text = SUBCOMMANDS[name]
    verbose = "--verbose" in argv[1:]
    quiet.configure(verbose)  # before any library that warns is imported
    module = importlib.import_module(module_name)
    sub_parser = argparse.ArgumentParser(prog=f"attnrl {name}", description=help_text)
    module.add_arguments(sub_parser)
    if not any(a.dest == "verbose" for a in sub_parser._actions):
        sub_parser.add_argument("--verbose", action="store_true",
                                help="show every library warning and log line")
    if hasattr(module, "parse_known"):  # subcommands taking free-form --key value overrides
        args = module.parse_known(sub_parser, argv[1:])
    else:
        args = sub_parser.parse_args(argv[1:])
    args.argv = argv
    try:
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"attnrl {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or attnrl.errors.Interrupted (SIGINT/SIGTERM)
        if not getattr(err, "reported", False):
            print(f"attnrl {name}: {getattr(err, 'message', '') or 'interrupted (SIGINT)'}",
                  file=sys.stderr)
        return getattr(err, "code", 130)


if __name__ == "__main__":
    sys.exit(main())
