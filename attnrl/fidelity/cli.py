"""`attnrl fidelity`: is each credit strategy's per-token credit where the outcome is decided?

Samples responses per problem, cuts each into at most K chunks, estimates the value of every
prefix from k continuations (attnrl.fidelity.values), computes every strategy's gamma from
the trainer's loss forward (attnrl.fidelity.weights) and scores the credit against the
Monte-Carlo step advantages (attnrl.fidelity.stats, .report, .render). Writes
records.jsonl (one response per line), summary.json, table.md and fidelity.png to --out.
"""

from __future__ import annotations

import time
from pathlib import Path

from attnrl import cli_checks
from attnrl.cli_checks import DEFAULT_MODEL
from attnrl.errors import UserError

COMMAND_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 256}
"""Sampling when neither the command line nor --config says (1.0, 1.0: TRL's defaults)."""
CREDIT_KEYS = {"gamma_amp": "gamma_amp", "credit_seed": "seed", "signal_layers": "layers",
               "signal_head_quantile": "head_quantile", "signal_window": "window",
               "signal_h_lo": "h_lo", "signal_h_hi": "h_hi", "signal_q": "q",
               "preplan_by": "preplan_by", "coupled_k": "k", "coupled_alpha": "alpha",
               "tau_waad": "tau_waad", "tau_delta": "tau_delta", "qk_damp": "qk_damp"}
"""Training-config keys that set the credit (trainers' AttnGRPOConfig.credit_config)."""


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None,
                        help="local HF model directory or 'smollm2' (default: the --config "
                             "run's final/ model, else its model, else smollm2)")
    from attnrl.evaluation import add_run_arguments

    add_run_arguments(parser, "measure on its task (task_kwargs, instruction), its held-out "
                              "problems, its sampling (temperature, top_p, "
                              "max_completion_length) and its credit settings")
    parser.add_argument("-n", "--num-problems", type=int, default=64, help="problems (default 64)")
    parser.add_argument("--samples", type=int, default=2, help="responses per problem (default 2)")
    parser.add_argument("--max-chunks", type=int, default=4,
                        help="K: at most this many chunks per response (>= 2; default 4)")
    parser.add_argument("--chunking", choices=("auto", "sentence", "tokens"), default="auto",
                        help="auto: sentence ends where a response has >= 2 sentences, else "
                             "equal token chunks")
    parser.add_argument("--continuations", type=int, default=8,
                        help="k: continuations sampled per prefix (>= 2; default 8)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature (default: the run's, else 1.0)")
    parser.add_argument("--top-p", type=float, default=None, help="(default: the run's, else 1.0)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="response length cap (default: the run's max_completion_length, "
                             "else 256)")
    parser.add_argument("--strategies", default=None,
                        help="comma-separated credit strategies (default: every registered "
                             "one that places credit within a response)")
    parser.add_argument("--permutations", type=int, default=200,
                        help="random placements of each response's gamma (the null; default "
                             "200)")
    parser.add_argument("--qk-top-k", type=int, default=None,
                        help="QK heads selected, on the other half of the problems (default: the "
                             "run's qk_top_k, else 4)")
    parser.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    parser.add_argument("--device", default="cpu", help="device of the credit forward")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16: weights in bf16 and the forward under autocast")
    parser.add_argument("--seed", type=int, default=None,
                        help="problems, sampling and statistics seed (default: the run's "
                             "held-out seed, else 0)")
    parser.add_argument("--out", default="fidelity_out", help="output directory")
    parser.add_argument("--summary-only", action="store_true",
                        help="rebuild summary.json and fidelity.png from --out's records.jsonl "
                             "(after a change of the statistics); samples and loads nothing")


def _read_run(path: str | None) -> tuple[dict, Path | None]:
    """(the run's config dict, its output_dir or None) from --config: a directory, or a
    config.yaml beside a final/ model, names a run."""
    from attnrl.evaluation import read_run_config

    if path is None:
        return {}, None
    config, config_path = read_run_config(path)
    run = config_path.parent
    return config, (run if Path(path).is_dir() or (run / "final").is_dir() else None)


def _strategies(text: str | None) -> list[str]:
    """The strategies to measure (checked by name, without torch)."""
    from attnrl.credit_names import (
        ATTENTION_CREDIT,
        check_credit,
        within_response_problem,
        within_response_strategies,
    )

    if text is None:
        return within_response_strategies()
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise UserError("--strategies is empty; name at least one, e.g. --strategies "
                        "coupled,random")
    for name in names:
        reads = {ATTENTION_CREDIT.get(p) for p in check_credit(name)}
        why = within_response_problem(name)
        if why:
            raise UserError(f"--strategies {name!r} {why}, so fidelity cannot measure it; "
                            "leave it out")
        if {"qk", "signals"} <= reads:   # the QK path gets entropy and draws, not signals
            raise UserError(f"--strategies {name!r} joins a QK strategy with one that reads "
                            "the attention signals, which fidelity does not measure; measure "
                            "the parts one at a time")
    return names


def _check_attention(model: str, strategies: list[str]) -> None:
    """Strategies that read the attention need attention the capture computes exactly
    (read from config.json, before the model loads)."""
    from attnrl.attention_config import attention_softcap, read_config
    from attnrl.credit_names import ATTENTION_CREDIT

    reading = [s for s in strategies if any(p.strip() in ATTENTION_CREDIT
                                            for p in s.split("+"))]
    config = read_config(model) if reading and not cli_checks.is_packaged(model) else None
    softcap = attention_softcap(config) if config else None
    if softcap:
        others = [s for s in strategies if s not in reading]
        raise UserError(f"--strategies {','.join(reading)} read the attention of {model}, whose "
                        f"logits are softcapped (attn_logit_softcapping={softcap:g}), which the "
                        "capture cannot compute exactly; measure the others: --strategies "
                        f"{','.join(others) or 'uniform,random,entropy'}")


def _check(args) -> dict:
    """Every check that needs no model; returns the resolved settings."""
    for name, least in (("num_problems", 1), ("samples", 1), ("max_chunks", 2),
                        ("continuations", 2), ("permutations", 1)):
        if getattr(args, name) < least:
            flag = "--" + name.replace("_", "-")
            what = {"max_chunks": " (K: a response needs two chunks for a step advantage)",
                    "continuations": " (k: one continuation cannot show uncertainty)"}
            raise UserError(f"{flag} must be >= {least}{what.get(name, '')}, got "
                            f"{getattr(args, name)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a directory")
    strategies = _strategies(args.strategies)
    config, run_dir = _read_run(args.config)
    from attnrl.evaluation import task_settings

    settings = task_settings(args.config, args.task, args.task_kwargs, args.seed)
    model = args.model
    if model is None:
        final = run_dir / "final" if run_dir is not None else None
        model = str(final) if final is not None and (final / "config.json").is_file() \
            else str(config.get("model", DEFAULT_MODEL))
    cli_checks.check_model(model)
    cli_checks.check_device(args.device)
    cli_checks.check_task(settings["task"], need_answers=True,
                          task_kwargs=settings["task_kwargs"])
    sampling = {"temperature": args.temperature if args.temperature is not None
                else config.get("temperature", COMMAND_DEFAULTS["temperature"]),
                "top_p": args.top_p if args.top_p is not None
                else config.get("top_p", COMMAND_DEFAULTS["top_p"]),
                "max_tokens": args.max_tokens if args.max_tokens is not None
                else config.get("max_completion_length", COMMAND_DEFAULTS["max_tokens"])}
    if not sampling["temperature"] > 0 or not 0 < sampling["top_p"] <= 1 \
            or sampling["max_tokens"] < 1:
        raise UserError(f"need temperature > 0 (values need sampled continuations), "
                        f"0 < top-p <= 1 and max-tokens >= 1; got {sampling}")
    credit = {field: config[key] for key, field in CREDIT_KEYS.items() if key in config}
    cli_checks.check_layers(credit.get("layers"), model, "signal_layers")
    _check_attention(model, strategies)
    qk_top_k = args.qk_top_k if args.qk_top_k is not None else int(config.get("qk_top_k", 4))
    if qk_top_k < 1:
        raise UserError(f"--qk-top-k must be >= 1, got {qk_top_k}")
    return {"strategies": strategies, "model": model, "task": settings, "sampling": sampling,
            "credit": credit, "qk_top_k": qk_top_k, "qk_layers": config.get("qk_layers"),
            "seed": int(settings["seed"]), "run_config": args.config}


def _summary_only(args) -> int:
    from attnrl.fidelity.pipeline import resummarize
    from attnrl.fidelity.render import format_table

    out = Path(args.out)
    if not (out / "records.jsonl").is_file() or not (out / "summary.json").is_file():
        raise UserError(f"--summary-only: {out} holds no records.jsonl and summary.json; give "
                        "the --out of a finished `attnrl fidelity` run")
    print(format_table(resummarize(out)))
    print(f"# rewrote {out / 'summary.json'}, {out / 'table.md'}, {out / 'fidelity.png'}")
    return 0


def run(args) -> int:
    if args.summary_only:
        return _summary_only(args)
    start = time.perf_counter()
    resolved = _check(args)                     # before torch, vLLM and any model
    from attnrl.fidelity.pipeline import measure

    out = Path(args.out)
    summary = measure(args, resolved, out, start)
    from attnrl.fidelity.render import format_table

    print(format_table(summary))
    print(f"# wrote {out / 'records.jsonl'}, {out / 'summary.json'}, {out / 'table.md'}, "
          f"{out / 'fidelity.png'} "
          f"({time.perf_counter() - start:.0f} s)")
    return 0
