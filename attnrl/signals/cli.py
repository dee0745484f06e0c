"""`attnrl signals`: WAAD / FAI / preplan / anchor tokens of one response, as pictures, and
with `--credit STRATEGY` the per-token credit that strategy gives it.

The prompt is given as text (`--prompt`) or taken from a task (`--task NAME --index I`, or
the `--config RUN` run's task); the response is given (`--response`) or generated with
transformers (greedy unless `--temperature` > 0). `--config RUN` also takes the run's model
(its final/, else its base), its signal settings and its credit strategy, unless given.
Writes signals.json (per-token values), signals.png and signals.html into `--out`, and
with a credit strategy credit.html: each token coloured by A_t = gamma_t A_i, the outcome
advantage A_i being +1 for a correct (or ungraded) response and -1 for an incorrect one
(`--advantage` sets it).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from attnrl import cli_checks
from attnrl.cli_checks import DEFAULT_MODEL
from attnrl.errors import UserError

SIGNAL_DEFAULTS = {"h_lo": 10, "h_hi": "100", "window": 10, "q": 0.4, "preplan_by": "delta"}
"""The signal options' values when neither the command line nor a --config run sets them
(attnrl.signals.types.SignalConfig's)."""
RUN_SIGNAL_KEYS = {"layers": "signal_layers", "h_lo": "signal_h_lo", "h_hi": "signal_h_hi",
                   "window": "signal_window", "q": "signal_q", "preplan_by": "preplan_by"}


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None,
                        help="local HF model directory, a LoRA adapter directory or 'smollm2' "
                        "(packaged); default: the --config run's final/, else smollm2")
    parser.add_argument("--config", default=None,
                        help="a training run (its output_dir or config.yaml): its model, task, "
                        "signal settings and credit strategy, unless given here")
    source = parser.add_argument_group("prompt (one of)")
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--task", help="reasoning-gym task name or a data file (default: the "
                        "--config run's task)")
    source.add_argument("--task_kwargs", "--task-kwargs", default=None, metavar="YAML",
                        help="task generator arguments, e.g. '{min_terms: 2, max_terms: 2}'")
    source.add_argument("--index", type=int, default=0, help="which prompt of --task (0-based)")
    parser.add_argument("--seed", type=int, default=None,
                        help="task generator and sampling seed (default 0; with --config the "
                        "run's held-out seed)")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="feed the prompt text as is (default: the tokenizer's chat template)")
    parser.add_argument("--response", help="response text (default: generate one)")
    parser.add_argument("--answer", help="gold answer for --prompt (with --task: the task's)")
    parser.add_argument("--max-tokens", type=int, default=128, help="generation length cap")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="generation temperature; 0 = greedy")
    signals = parser.add_argument_group("signals (docs/methods.md section 1; defaults: the "
                                        "--config run's, else these)")
    signals.add_argument("--layers", help="comma-separated layer indices (default: five in the "
                                          "middle third)")
    signals.add_argument("--h-lo", type=int, default=None, help="FAI: nearest future query (10)")
    signals.add_argument("--h-hi", default=None, help="FAI: farthest future query, or 'end' for "
                         "the whole sequence (100)")
    signals.add_argument("--window", type=int, default=None, help="WAAD distance clip W (10)")
    signals.add_argument("--q", type=float, default=None, help="top fraction marked (0.4)")
    signals.add_argument("--preplan-by", choices=("delta", "waad"), default=None,
                         help="(delta)")
    credit = parser.add_argument_group("credit")
    credit.add_argument("--credit", default=None, metavar="STRATEGY",
                        help="draw the per-token credit of this strategy (e.g. coupled, "
                        "global_anchor+entropy) into credit.html; default: the --config "
                        "run's, else none")
    credit.add_argument("--advantage", type=float, default=None,
                        help="the outcome advantage A_i the credit shapes (default +1 for a "
                        "correct or ungraded response, -1 for an incorrect one)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--out", default="signals_out", help="output directory")


def fill_from_run(args) -> dict | None:
    """The --config run's model, signal settings and credit where the command line gives
    none, then the defaults; returns the run's config (None without --config)."""
    run = None
    if args.config:
        from attnrl.evaluation import read_run_config

        run, _ = read_run_config(args.config)
        if args.model is None:
            given = Path(args.config)
            run_dir = given if given.is_dir() else Path(run.get("output_dir") or "")
            final = run_dir / "final"
            args.model = str(final) if final.is_dir() else str(run.get("model", DEFAULT_MODEL))
        for name, key in RUN_SIGNAL_KEYS.items():
            if getattr(args, name) is None and key in run:
                value = run[key]
                if name == "layers":
                    value = None if value is None else ",".join(map(str, value))
                elif name == "h_hi" and value is None:
                    value = "end"
                setattr(args, name, value)
        if args.credit is None:
            args.credit = run.get("credit")
    if args.model is None:
        args.model = DEFAULT_MODEL
    for name, value in SIGNAL_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return run


def signal_config(args, run: dict | None = None):
    """A SignalConfig from the command's options over the run's other signal settings
    (coupled_k, coupled_alpha, ...; bad values -> UserError before torch is imported)."""
    layers = cli_checks.parse_layers(args.layers)
    h_hi_text = str(args.h_hi).strip().lower()
    if h_hi_text in ("end", "none"):
        h_hi = None
    else:
        try:
            h_hi = int(h_hi_text)
        except ValueError:
            raise UserError(f"--h-hi {args.h_hi!r}: give an integer or 'end'") from None
    if args.h_lo < 1 or (h_hi is not None and h_hi < args.h_lo):
        raise UserError(f"need 1 <= --h-lo <= --h-hi, got {args.h_lo} and {args.h_hi}")
    if args.window < 1:
        raise UserError(f"--window must be >= 1, got {args.window}")
    if not 0 < args.q <= 1:
        raise UserError(f"--q must be in (0, 1], got {args.q}")
    from attnrl.signals.types import SignalConfig

    given = {"layers": layers, "h_lo": args.h_lo, "h_hi": h_hi, "window": args.window,
             "q": args.q, "preplan_by": args.preplan_by}
    if run is None:
        return SignalConfig(**given)
    import dataclasses

    from attnrl.credit import credit_config_from_run

    return dataclasses.replace(credit_config_from_run(run).signals, **given)


def _task_settings(args) -> dict | None:
    """The task to take the prompt from (attnrl.evaluation.task_settings), None for --prompt."""
    if args.prompt is not None:
        return None
    from attnrl.evaluation import task_settings

    return task_settings(args.config, args.task, args.task_kwargs, args.seed)


def _prompt_text(args, tokenizer, settings):
    """(question as given, text fed to the model, the prompt record)."""
    from attnrl.data import PromptRecord, apply_chat_template, load_prompts
    from attnrl.evaluation import format_prompts

    if settings is None:
        if not args.prompt.strip():
            raise UserError("--prompt is empty")
        record = PromptRecord(question=args.prompt, answer=args.answer or "", source="--prompt",
                              index=0)
        if args.no_chat_template:
            return record.question, record.question, record
        apply_chat_template([record], tokenizer, instruction=None)
        return record.question, record.prompt, record
    records = load_prompts(settings["task"], size=args.index + 1, seed=settings["seed"],
                           **(settings["task_kwargs"] or {}), **settings["fields"])
    if args.index >= len(records):
        raise UserError(f"--index {args.index} is past the end of {settings['task']!r} "
                        f"({len(records)} prompts)")
    record = records[args.index]
    if args.no_chat_template:
        return record.question, record.question, record
    formatted = format_prompts([record], tokenizer, settings["instruction"],
                               settings["system_prompt"])[0][0]
    return record.question, formatted.prompt, formatted


def _grade(record, response_text: str) -> dict:
    """Gold answer, reward and correctness of the response (the task's reward; a --prompt
    without --answer has no gold and no verdict)."""
    if not record.answer and "entry" not in record.metadata:
        return {"gold": None, "reward": None, "correct": None}
    from attnrl.answers import answer_reward

    reward = answer_reward([record.prompt], [response_text], answer=[record.answer],
                           metadata=[record.metadata])[0]
    return {"gold": record.answer, "reward": float(reward), "correct": bool(reward >= 1.0)}


def _subtitle(grade: dict) -> str:
    if grade["gold"] is None:
        return "gold answer: not given (--answer) | correctness: unknown"
    verdict = "CORRECT" if grade["correct"] else "INCORRECT"
    return f"gold answer: {grade['gold']} | response: {verdict} (reward {grade['reward']:.2f})"


def _response_ids(args, model, tokenizer, prompt_ids: list[int]) -> list[int]:
    if args.response is not None:
        ids = tokenizer(args.response, add_special_tokens=False)["input_ids"]
    else:
        from attnrl.rollout import SamplingConfig
        from attnrl.rollout.hf import HFEngine

        if args.max_tokens < 1:
            raise UserError(f"--max-tokens must be >= 1, got {args.max_tokens}")
        sampling = SamplingConfig(n=1, temperature=args.temperature, max_tokens=args.max_tokens,
                                  seed=args.seed)
        ids = HFEngine(model, tokenizer).generate([prompt_ids], sampling)[0][0].token_ids
    if not ids:
        raise UserError("the response is empty: give a non-empty --response or raise --max-tokens")
    return list(ids)


def _check(args) -> None:
    """Every argument check that needs no model, before torch loads."""
    cli_checks.check_model(args.model)
    cli_checks.check_layers(cli_checks.parse_layers(args.layers), args.model)
    cli_checks.check_device(args.device)
    if args.prompt is not None and args.task is not None:
        raise UserError("give one of --prompt TEXT or --task NAME (with --index I), not both")
    if args.prompt is None and args.task is None and not args.config:
        raise UserError("give --prompt TEXT, --task NAME (with --index I) or --config RUN (its "
                        "task)")
    if args.index < 0:
        raise UserError(f"--index must be >= 0, got {args.index}")
    if args.task is not None:
        cli_checks.check_task(args.task)
    if args.response is None and args.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.credit:
        from attnrl.credit_names import ATTENTION_CREDIT, check_credit

        for part in check_credit(args.credit):
            if ATTENTION_CREDIT.get(part) == "qk":
                raise UserError(f"--credit {args.credit}: {part} needs the QK heads a run "
                                "selects from its rollouts during training; signals draws the "
                                "strategies that need no selection (e.g. coupled, entropy)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a directory")


def run(args) -> int:
    run_config = fill_from_run(args)
    _check(args)
    config = signal_config(args, run_config)  # its value checks, still before torch
    settings = _task_settings(args)
    if settings is not None:
        cli_checks.check_task(settings["task"], task_kwargs=settings["task_kwargs"],
                              fields=settings["fields"])
    if args.seed is None:
        args.seed = settings["seed"] if settings is not None else 0
    import torch

    from attnrl.models import load_model, load_tokenizer, resolve_model
    from attnrl.rollout import encode_prompts
    from attnrl.signals.capture import compute_token_signals
    from attnrl.signals.render import render_html, render_png, summarise, token_records

    model_dir = resolve_model(args.model)            # fail fast on a bad path
    tokenizer = load_tokenizer(model_dir)
    question, prompt, record = _prompt_text(args, tokenizer, settings)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a directory")
    try:
        model = load_model(model_dir, device=args.device)
    except (RuntimeError, AssertionError) as err:
        raise UserError(f"cannot load the model on device {args.device!r}: {err}") from None
    prompt_ids = encode_prompts(tokenizer, [prompt])[0]
    response_ids = _response_ids(args, model, tokenizer, prompt_ids)
    n_prompt = len(prompt_ids)
    input_ids = torch.tensor([prompt_ids + response_ids], device=args.device)
    attention_mask = torch.ones_like(input_ids)
    response_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    response_mask[0, n_prompt:] = True
    with torch.no_grad():
        signals = compute_token_signals(model, input_ids, attention_mask, response_mask,
                                        config=config)

    texts = [tokenizer.decode([t]) for t in response_ids]
    positions = list(range(n_prompt, n_prompt + len(response_ids)))
    records = token_records(response_ids, texts, positions, signals,
                            preplan_by=config.preplan_by)
    response_text = tokenizer.decode(response_ids, skip_special_tokens=True)
    grade = _grade(record, response_text)
    layers = [int(l) for l in signals.layers]
    result = {
        "model": str(args.model), "question": question, "prompt": prompt,
        "response": tokenizer.decode(response_ids), "prompt_ids": prompt_ids, **grade,
        "config": asdict(config), "layers": layers,
        "local_heads": [[layers[l], h] for l, h in signals.local_heads.nonzero().tolist()],
        "global_heads": [[layers[l], h] for l, h in signals.global_heads.nonzero().tolist()],
        "head_span": signals.head_span[0].tolist(), "tokens": records,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "signals.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    short = question if len(question) <= 90 else question[:87] + "..."
    title = f"{Path(str(args.model)).name}: {short}"
    h_hi = "end" if config.h_hi is None else config.h_hi
    render_png(records, out / "signals.png", title=title, subtitle=_subtitle(grade))
    render_html(records, out / "signals.html", title=title, image="signals.png",
                subtitle=_subtitle(grade), meta={
        "model": args.model, "prompt": prompt, "layers": layers,
        "local heads (layer, head)": result["local_heads"],
        "global heads (layer, head)": result["global_heads"],
        "W / H_lo / H_hi / q": f"{config.window} / {config.h_lo} / {h_hi} / {config.q}",
        "preplan by": config.preplan_by})
    stats = summarise(records)
    print(_subtitle(grade))
    print(f"{stats['tokens']} response tokens: {stats['preplan']} preplan, {stats['anchor']} "
          f"anchor (layers {layers}); WAAD max {stats['waad_max']:.2f}, "
          f"FAI max {stats['fai_max']:.4f}")
    written = ["signals.json", "signals.png", "signals.html"]
    if args.credit:
        result["credit"] = draw_credit(args, run_config, config, model, tokenizer, input_ids,
                                       response_mask, signals, grade, prompt_ids, response_ids,
                                       out / "credit.html", title)
        (out / "signals.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
        written.append("credit.html")
    for name in written:
        print(f"wrote {out / name}")
    return 0


def draw_credit(args, run_config, signal_settings, model, tokenizer, input_ids, response_mask,
                signals, grade, prompt_ids, response_ids, path, title) -> dict:
    """The credit `args.credit` gives the response (gamma and A_t = gamma_t A_i), drawn into
    `path`; what signals.json records of it. Entropy (for the entropy strategies) is that of
    the sampling distribution at the run's temperature (1 without a run)."""
    import dataclasses

    import torch

    from attnrl.credit import (
        compute_gamma,
        credit_config_from_run,
        make_generator,
        required_inputs,
        shape_advantages,
    )
    from attnrl.signals.credit_page import credit_sample, render_credit_html

    credit = dataclasses.replace(credit_config_from_run(run_config or {}, strategy=args.credit),
                                 signals=signal_settings)
    outcome = args.advantage if args.advantage is not None else \
        (-1.0 if grade["correct"] is False else 1.0)
    entropy = None
    if "entropy" in required_inputs(credit):
        temperature = float((run_config or {}).get("temperature") or 1.0)
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits.float() / temperature
        step = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
        entropy = torch.zeros(response_mask.shape, dtype=torch.float32, device=logits.device)
        entropy[:, 1:] = step[:, :-1]  # the distribution each token was drawn from
    gamma = compute_gamma(credit, signals, response_mask, entropy=entropy,
                          generator=make_generator(credit))
    advantages = shape_advantages(credit, torch.tensor([outcome], device=gamma.device), gamma,
                                  response_mask)
    at = response_mask[0]
    sample = credit_sample(tokenizer, prompt_ids, response_ids, advantages[0, at].tolist(),
                           gamma[0, at].tolist(), outcome,
                           preplan=signals.preplan_mask[0, at].tolist(),
                           anchor=signals.anchor_mask[0, at].tolist(), reward=grade["reward"])
    render_credit_html([sample], path, title=f"{title}: credit {args.credit}",
                       meta={"strategy": args.credit, "gamma_amp": credit.gamma_amp,
                             "apply_to": credit.apply_to,
                             "outcome advantage A_i": f"{outcome:+g}"})
    amplified = sum(g > 1 for g in sample["gamma"])
    damped = sum(g < 1 for g in sample["gamma"])
    print(f"credit {args.credit}: A_i {outcome:+g}; {amplified} of {len(response_ids)} tokens "
          f"amplified, {damped} damped")
    return {"strategy": args.credit, "outcome_advantage": outcome,
            "gamma": sample["gamma"], "advantage": sample["advantage"]}
