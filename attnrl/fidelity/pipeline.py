"""The steps of `attnrl fidelity` after its checks: sample, cut, value, weigh, score, write."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

from attnrl import atomic
from attnrl.errors import UserError
from attnrl.evaluation import CORRECT_THRESHOLD  # correct: answer reward >= 1


def _say(start: float, text: str) -> None:
    print(f"  [{time.perf_counter() - start:5.0f} s] {text}", flush=True)


def _problems(resolved: dict, tokenizer, count: int):
    """(records, prompt ids) of the problems: the --config run's held-out ones (none in its
    training pool), else the task's first `count` distinct problems from the seed."""
    from attnrl.data.unseen import draw_unseen
    from attnrl.evaluation import format_prompts

    task = resolved["task"]
    draw = draw_unseen(task["task"], count, resolved["seed"], task["task_kwargs"],
                       task["pool"], what="--num-problems")
    records, prompt_ids = format_prompts(draw.records, tokenizer, task["instruction"],
                                         task["system_prompt"])
    return records, prompt_ids


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text for the sentence rule; special tokens (EOS) read as '' so that they
    join the sentence before them instead of forming a chunk of their own."""
    return [tokenizer.decode([t], skip_special_tokens=True) for t in ids]


def _scorer(records):
    from attnrl.answers import answer_reward

    def score(problems, texts):
        rewards = answer_reward([records[p].prompt for p in problems], texts,
                                answer=[records[p].answer for p in problems],
                                metadata=[records[p].metadata for p in problems])
        return [r >= CORRECT_THRESHOLD for r in rewards]
    return score


def credit_config(settings: dict):
    """The CreditConfig of the run's credit keys ({CreditConfig / SignalConfig field: value})."""
    from attnrl.credit import CreditConfig
    from attnrl.signals.types import SignalConfig

    signal_fields = set(SignalConfig.__dataclass_fields__)
    return CreditConfig(
        strategy="uniform", **{k: v for k, v in settings.items() if k not in signal_fields},
        signals=SignalConfig(**{k: v for k, v in settings.items() if k in signal_fields}))


def measure(args, resolved: dict, out: Path, start: float) -> dict:
    """Run everything; write records.jsonl, summary.json and fidelity.png; return the
    summary."""
    import torch

    credit = credit_config(resolved["credit"])       # a bad value: one line, nothing loaded

    from attnrl.fidelity.chunks import chunk_bounds
    from attnrl.fidelity.render import format_table, plot_fidelity
    from attnrl.fidelity.report import response_records, summarize
    from attnrl.fidelity.values import CutResponse, estimate_values
    from attnrl.fidelity.weights import strategy_weights
    from attnrl.models import load_model, load_tokenizer, resolve_model
    from attnrl.rollout import SamplingConfig, make_engine

    model_dir = resolve_model(resolved["model"])
    tokenizer = load_tokenizer(model_dir)
    records, prompt_ids = _problems(resolved, tokenizer, args.num_problems)
    sampling = resolved["sampling"]
    score = _scorer(records)
    kwargs = {}
    if args.engine == "vllm":
        longest = max(map(len, prompt_ids)) + sampling["max_tokens"]
        kwargs = {"max_model_len": longest, "seed": resolved["seed"]}
    _say(start, f"{len(records)} problems of {resolved['task']['task']}; sampling "
                f"{args.samples} responses each ({args.engine}, T={sampling['temperature']}, "
                f"top-p {sampling['top_p']}, <= {sampling['max_tokens']} tokens)")
    engine = make_engine(args.engine, str(model_dir), **kwargs)
    try:
        groups = engine.generate(prompt_ids, SamplingConfig(
            n=args.samples, temperature=sampling["temperature"], top_p=sampling["top_p"],
            max_tokens=sampling["max_tokens"], seed=resolved["seed"]))
        cuts = []
        for p, group in enumerate(groups):
            texts = [c.text for c in group]
            outcomes = score([p] * len(texts), texts)
            for completion, correct in zip(group, outcomes):
                ids = list(completion.token_ids)
                if not ids:
                    continue
                bounds, how = chunk_bounds(token_texts(tokenizer, ids),
                                           args.max_chunks, args.chunking)
                cuts.append(CutResponse(problem=p, prompt_ids=list(prompt_ids[p]),
                                        response_ids=ids, correct=bool(correct),
                                        bounds=bounds, chunking=how, text=completion.text))
        if not cuts:
            raise UserError("every sampled response is empty; raise --max-tokens or check "
                            "the model")
        accuracy = sum(c.correct for c in cuts) / len(cuts)
        interior = sum(len(c.bounds) - 2 for c in cuts)
        _say(start, f"{len(cuts)} responses, {accuracy:.1%} correct; continuing "
                    f"{interior + len(records)} prefixes x {args.continuations}")
        mc = estimate_values(engine, cuts, args.continuations, sampling["temperature"],
                             sampling["top_p"], sampling["max_tokens"], resolved["seed"] + 1,
                             score)
    finally:
        engine.close()
        del engine
        gc.collect()
    _say(start, f"{mc['completions']} continuations scored; credit forwards")
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    try:
        model = load_model(model_dir, dtype=dtype, device=args.device)
    except (RuntimeError, AssertionError) as err:
        raise UserError(f"cannot load the model on device {args.device!r}: {err}") from None
    eos = [t for t in {tokenizer.eos_token_id, tokenizer.pad_token_id} if t is not None]

    def progress(done, total):
        if done == total or done % max(1, total // 4) == 0:
            _say(start, f"forward {done}/{total} problems")

    gammas, info = strategy_weights(
        model, cuts, resolved["strategies"], credit, sampling["temperature"], eos,
        qk_top_k=resolved["qk_top_k"], qk_layers=resolved["qk_layers"], seed=resolved["seed"],
        autocast_dtype=torch.bfloat16 if args.dtype == "bfloat16" else None,
        progress=progress)
    del model
    gc.collect()
    settings = {"model": str(resolved["model"]), "config": resolved["run_config"],
                "task": resolved["task"]["task"],
                "task_kwargs": resolved["task"]["task_kwargs"],
                "problems": len(records), "responses_per_problem": args.samples,
                "max_chunks": args.max_chunks, "chunking": args.chunking,
                "continuations": args.continuations, **sampling,
                "gamma_amp": credit.gamma_amp, "q": credit.q,
                "permutations": args.permutations, "seed": resolved["seed"],
                "engine": args.engine, "dtype": args.dtype, "qk_heads": info["qk_heads"]}
    rows = response_records(cuts, gammas, credit.gamma_amp, args.permutations,
                            resolved["seed"], records)
    summary = summarize(rows, list(gammas), settings)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["monte_carlo"] = mc
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "records.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic.write_text(out / "summary.json", json.dumps(summary, indent=1))
    atomic.write_text(out / "table.md", format_table(summary) + "\n")
    plot_fidelity(rows, summary, out / "fidelity.png")
    return summary


def resummarize(out: Path) -> dict:
    """Recompute summary.json and fidelity.png from out/records.jsonl with the current
    statistics (the settings, timings and Monte-Carlo counts of the old summary are kept)."""
    from attnrl.fidelity.render import format_table, plot_fidelity
    from attnrl.fidelity.report import CONTROLS, summarize

    old = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()
            if line.strip()]
    names = [n for n in old["strategies"] if n not in CONTROLS]
    summary = summarize(rows, names, old["settings"])
    for key in ("seconds", "monte_carlo"):
        if key in old:
            summary[key] = old[key]
    atomic.write_text(out / "summary.json", json.dumps(summary, indent=1))
    atomic.write_text(out / "table.md", format_table(summary) + "\n")
    plot_fidelity(rows, summary, out / "fidelity.png")
    return summary

