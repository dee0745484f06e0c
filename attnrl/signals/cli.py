"""`attnrl signals`: WAAD / FAI / preplan / anchor tokens of one response, as pictures.

The prompt is given as text (`--prompt`) or taken from a task (`--task NAME --index I`);
the response is given (`--response`) or generated with transformers (greedy unless
`--temperature` > 0). Writes signals.json (per-token values), signals.png and
signals.html into `--out`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from attnrl import cli_checks
from attnrl.cli_checks import DEFAULT_MODEL
from attnrl.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="local HF model directory or 'smollm2' (packaged)")
    source = parser.add_argument_group("prompt (one of)")
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--task", help="reasoning-gym task name or a GSM8K-style .jsonl file")
    source.add_argument("--index", type=int, default=0, help="which prompt of --task (0-based)")
    parser.add_argument("--seed", type=int, default=0, help="task generator and sampling seed")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="feed the prompt text as is (default: the tokenizer's chat template)")
    parser.add_argument("--response", help="response text (default: generate one)")
    parser.add_argument("--answer", help="gold answer for --prompt (with --task: the task's)")
    parser.add_argument("--max-tokens", type=int, default=128, help="generation length cap")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="generation temperature; 0 = greedy")
    signals = parser.add_argument_group("signals (docs/methods.md section 1)")
    signals.add_argument("--layers", help="comma-separated layer indices (default: five in the "
                                          "middle third)")
    signals.add_argument("--h-lo", type=int, default=10, help="FAI: nearest future query")
    signals.add_argument("--h-hi", default="100",
                         help="FAI: farthest future query, or 'end' for the whole sequence")
    signals.add_argument("--window", type=int, default=10, help="WAAD distance clip W")
    signals.add_argument("--q", type=float, default=0.4, help="top fraction marked")
    signals.add_argument("--preplan-by", choices=("delta", "waad"), default="delta")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--out", default="signals_out", help="output directory")


def signal_config(args):
    """A SignalConfig from the command's options (bad values -> UserError before torch
    is imported)."""
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

    return SignalConfig(layers=layers, h_lo=args.h_lo, h_hi=h_hi, window=args.window,
                        q=args.q, preplan_by=args.preplan_by)


def _prompt_text(args, tokenizer):
    """(question as given, text fed to the model, the prompt record)."""
    from attnrl.data import DEFAULT_INSTRUCTION, PromptRecord, apply_chat_template, load_prompts

    if (args.prompt is None) == (args.task is None):
        raise UserError("give exactly one of --prompt TEXT or --task NAME (with --index I)")
    if args.prompt is not None:
        if not args.prompt.strip():
            raise UserError("--prompt is empty")
        record = PromptRecord(question=args.prompt, answer=args.answer or "", source="--prompt",
                              index=0)
        instruction = None
    else:
        if args.index < 0:
            raise UserError(f"--index must be >= 0, got {args.index}")
        records = load_prompts(args.task, size=args.index + 1, seed=args.seed)
        if args.index >= len(records):
            raise UserError(f"--index {args.index} is past the end of {args.task!r} "
                            f"({len(records)} prompts)")
        record = records[args.index]
        instruction = DEFAULT_INSTRUCTION
    if args.no_chat_template:
        return record.question, record.question, record
    apply_chat_template([record], tokenizer, instruction=instruction)
    return record.question, record.prompt, record


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
    if (args.prompt is None) == (args.task is None):
        raise UserError("give exactly one of --prompt TEXT or --task NAME (with --index I)")
    if args.task is not None:
        if args.index < 0:
            raise UserError(f"--index must be >= 0, got {args.index}")
        cli_checks.check_task(args.task)
    if args.response is None and args.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a directory")


def run(args) -> int:
    _check(args)
    signal_config(args)  # its value checks, still before torch
    import torch

    from attnrl.models import load_model, load_tokenizer, resolve_model
    from attnrl.rollout import encode_prompts
    from attnrl.signals.capture import compute_token_signals
    from attnrl.signals.render import render_html, render_png, summarise, token_records

    config = signal_config(args)
    model_dir = resolve_model(args.model)            # fail fast on a bad path
    tokenizer = load_tokenizer(model_dir)
    question, prompt, record = _prompt_text(args, tokenizer)
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
    for name in ("signals.json", "signals.png", "signals.html"):
        print(f"wrote {out / name}")
    return 0
