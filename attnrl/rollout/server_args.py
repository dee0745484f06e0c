"""The rollout server's effective settings, read with vLLM's own argument parser.

launch/vllm_server.sh forwards whatever follows `--` to vLLM's OpenAI-compatible server.
A forwarded option repeats one the script set (`--host`, `--port`, `--logprobs-mode`,
`--model`), and in vLLM the last value wins; so the script's checks run on the arguments
as vLLM itself parses them, all of them, in the order the server gets them.

    python -m attnrl.rollout.server_args --model DIR -- VLLM_ARGS...

prints `HOST PORT` (HOST '0.0.0.0' when vLLM would listen on every interface) or one
error line on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from dataclasses import dataclass

from attnrl.errors import UserError

GUARD = "attnrl.rollout.server_guard.ServerGuard"
LOGPROBS_MODE = "processed_logprobs"
"""Log-probs of the sampling distribution (after temperature / top-p): what the trainer
corrects for."""


def parse_server_args(argv: list[str]) -> argparse.Namespace:
    """`argv` (no program name) parsed exactly as `python -m vllm.entrypoints.openai.
    api_server` parses it. Raises UserError (with argparse's reason) when vLLM would
    refuse it."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm api_server"))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(list(map(str, argv)))
    except SystemExit:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        reason = lines[-1] if lines else "no reason given"
        raise UserError(f"vLLM's parser refuses the server arguments ({reason}): fix the "
                        "options given after '--'") from None


@dataclass(frozen=True)
class ServerSettings:
    host: str
    """Listen address; '0.0.0.0' when vLLM listens on every interface (no --host)."""
    port: int
    logprobs_mode: str


def check_server_args(argv: list[str], model) -> ServerSettings:
    """The settings vLLM will run with, after the checks a rollout server needs: the
    model is `model`, log-probs are `processed_logprobs`, attnrl's guard is loaded, and it
    listens on TCP. UserError (one line, naming the option) otherwise."""
    args = parse_server_args(argv)
    served = args.model_tag or args.model
    if os.path.realpath(str(served)) != os.path.realpath(str(model)):
        raise UserError(f"the server would serve --model {served} but the script was given "
                        f"--model {model}: give the model once, to the script")
    if args.logprobs_mode != LOGPROBS_MODE:
        raise UserError(f"--logprobs-mode {args.logprobs_mode} after '--': the trainer needs "
                        f"the log-probs of the sampling distribution ({LOGPROBS_MODE}, which "
                        "the script sets); remove it")
    if GUARD not in (args.middleware or []):
        raise UserError(f"the server would start without attnrl's guard ({GUARD} in "
                        "--middleware): start it through launch/vllm_server.sh")
    if getattr(args, "uds", None):
        raise UserError("--uds after '--': the trainer reaches the server over TCP "
                        "(rollout_server_url); remove it")
    return ServerSettings(host=args.host or "0.0.0.0", port=int(args.port),
                          logprobs_mode=args.logprobs_mode)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv or argv[:1] != ["--model"] or argv.index("--") != 2:
        print("usage: python -m attnrl.rollout.server_args --model DIR -- VLLM_ARGS...",
              file=sys.stderr)
        return 2
    try:
        settings = check_server_args(argv[3:], model=argv[1])
    except UserError as err:
        print(err, file=sys.stderr)
        return 2
    print(settings.host, settings.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
