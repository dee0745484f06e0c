"""`attnrl analyze`: does this model show the preplan-and-anchor rhythm, and do its QK heads
know when it is right?

Samples K responses per problem with a rollout engine (or reads prompt / response pairs),
scores them with the task's reward (sampled responses are kept in samples.jsonl, readable
again with --responses), runs batched capture forwards (attnrl.analysis.forward)
and writes report.json (every number), report.html (figures, tables, example responses)
and prints a short summary with verdicts. Statistics: attnrl.analysis.coupling (peak
coupling), attnrl.analysis.auc (QK heads and baselines), attnrl.analysis.receivers
(receiver heads against their positional profile), attnrl.analysis.stats (shared).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from attnrl import cli_checks
from attnrl.cli_checks import DEFAULT_MODEL
from attnrl.errors import UserError

POSITION_BINS = 4  # attnrl.analysis.coupling.POSITION_BINS (that module imports torch)
PAIR_POOL = 8      # attnrl.analysis.coupling.PAIR_POOL


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="local HF model directory or 'smollm2' (packaged)")
    source = parser.add_argument_group("responses (one of)")
    source.add_argument("--task", help="reasoning-gym task, gsm8k:test / gsm8k:train, or a "
                                       "GSM8K-style .jsonl of questions: responses are sampled")
    source.add_argument("--responses", help="JSONL of 'prompt' / 'response' pairs with "
                                            "'correct', 'reward' or 'answer' per line")
    parser.add_argument("-n", "--num-problems", type=int, default=128, help="problems")
    parser.add_argument("--samples", type=int, default=4, help="responses per problem (K)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-tokens", type=int, default=256, help="response length cap")
    parser.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    parser.add_argument("--seed", type=int, default=0, help="task, sampling and statistics seed")
    stat = parser.add_argument_group("statistics")
    stat.add_argument("--peak-fraction", type=float, default=0.1,
                      help="p: top fraction of a response's tokens that are peaks (0.1 = 10%%)")
    stat.add_argument("--k", type=int, default=3, help="FAI peak within k tokens after a peak")
    stat.add_argument("--pair-pool", type=int, default=PAIR_POOL,
                      help="coupling verdict (cross-response null): FAI peaks paired with the "
                           "source peaks of other responses, within pools of this many "
                           "responses of similar length")
    stat.add_argument("--position-bins", type=int, default=POSITION_BINS,
                      help="secondary coupling null (no verdict): target peaks rotated within "
                           "this many bins of relative position per response")
    stat.add_argument("--permutations", type=int, default=10000, help="permutation-null draws")
    stat.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    stat.add_argument("--qk-top-k", type=int, default=4, help="QK heads selected (held-out)")
    sig = parser.add_argument_group("signals (methods.md section 1)")
    sig.add_argument("--layers", help="sampled layers, comma-separated (default: five in "
                                      "the middle third)")
    sig.add_argument("--h-lo", type=int, default=10, help="FAI: nearest future query")
    sig.add_argument("--h-hi", default="100",
                     help="FAI: farthest future query (100: the RL default the credit uses), or "
                          "'end' (the paper's analysis mode; costs O(N^2) per head)")
    sig.add_argument("--window", type=int, default=10, help="WAAD distance clip W")
    sig.add_argument("--q", type=float, default=0.4, help="top fraction of the token sets")
    sig.add_argument("--head-quantile", type=float, default=0.3, help="local / global fraction")
    stat.add_argument("--receiver-responses", type=int, default=64,
                      help="receiver heads: at most this many responses with >= 14 distinct sentences "
                           "(10 vertical scores; each costs one extra blockwise pass per layer)")
    parser.add_argument("--batch-tokens", type=int, default=4096,
                        help="padded tokens per analysis forward")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="analyze_out", help="output directory")


def _config(args):
    from attnrl.signals.cli import signal_config

    args.preplan_by = "delta"
    config = signal_config(args)
    config.head_quantile = args.head_quantile
    return config.validate()


def _check(args) -> None:
    if (args.task is None) == (args.responses is None):
        raise UserError("give exactly one of --task NAME (responses are sampled) or "
                        "--responses FILE.jsonl")
    for name in ("num_problems", "samples", "max_tokens", "permutations", "bootstrap",
                 "qk_top_k", "batch_tokens", "receiver_responses", "position_bins"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.pair_pool < 2:
        raise UserError(f"--pair-pool must be >= 2 (responses paired with each other), got "
                        f"{args.pair_pool}")
    if not 0 < args.peak_fraction <= 1:
        raise UserError(f"--peak-fraction must be in (0, 1], got {args.peak_fraction}")
    if args.k < 0:
        raise UserError(f"--k must be >= 0, got {args.k}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError(f"need --temperature >= 0 and 0 < --top-p <= 1; got {args.temperature}, "
                        f"{args.top_p}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a directory")
    # before torch and the model load: the model, its layers, the device, the task
    cli_checks.check_model(args.model)
    cli_checks.check_layers(cli_checks.parse_layers(args.layers), args.model)
    cli_checks.check_device(args.device)
    if args.task is not None:
        cli_checks.check_task(args.task, need_answers=True)
    elif not Path(args.responses).is_file():
        raise UserError(f"--responses {args.responses!r} does not exist: give a JSONL file "
                        "with 'prompt' and 'response' (and 'correct', 'reward' or 'answer') "
                        "per line")


def example_records(tokenizer, samples, results, signals, mask, count=2, max_len=160):
    """A few short correct and incorrect responses with their per-token WAAD / FAI."""
    chosen = []
    for want in (True, False):
        rows = [i for i, s in enumerate(samples) if s.correct == want
                and len(s.response_ids) <= max_len]
        rows.sort(key=lambda i: -len(samples[i].response_ids))
        chosen += [(want, i) for i in rows[:count]]
    out = []
    for want, i in chosen:
        n = int(mask[i].sum())
        ids = samples[i].response_ids
        out.append({"correct": want, "reward": samples[i].reward, "group": samples[i].group,
                    "tokens": [tokenizer.decode([t]) for t in ids][:n],
                    "waad": signals.waad[i, :n].tolist(), "fai": signals.fai[i, :n].tolist(),
                    "fai_valid": signals.fai_valid[i, :n].tolist(),
                    "preplan": signals.preplan_mask[i, :n].tolist(),
                    "anchor": signals.anchor_mask[i, :n].tolist()})
    return out


def analyse(args) -> dict:
    """Everything but the rendering: the report dict."""
    _check(args)  # before torch is imported
    from attnrl.analysis import report_data
    from attnrl.analysis.collect import read_responses, sample_task
    from attnrl.analysis.forward import analyse_samples
    from attnrl.analysis.summary import FORMAT
    from attnrl.models import load_model, load_tokenizer, resolve_model

    config = _config(args)
    t0 = time.perf_counter()
    model_dir = resolve_model(args.model)
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(str(model_dir))
    if hasattr(model_config, "get_text_config"):
        model_config = model_config.get_text_config()
    config.resolve_layers(int(model_config.num_hidden_layers))   # bad --layers: fail now
    info = {}
    if args.task is not None:
        samples, _, info = sample_task(args.model, args.task, args.num_problems, args.samples,
                                       args.temperature, args.top_p, args.max_tokens,
                                       args.seed, args.engine)
    else:
        samples, _ = read_responses(args.responses, args.model)
    if not samples:
        raise UserError("no non-empty responses to analyse")
    kept = 0
    for sample in samples:                     # receiver heads on the first few only
        if sample.spans is not None:
            kept += 1
            if kept > args.receiver_responses:
                sample.spans = None
    t_sample = time.perf_counter()
    tokenizer = load_tokenizer(model_dir)
    if args.task is not None:    # keep the sampled responses: `--responses` reads them back
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "samples.jsonl", "w") as handle:
            handle.writelines(json.dumps({
                "prompt": tokenizer.decode(s.prompt_ids), "response": s.text,
                "correct": bool(s.correct), "reward": s.reward, "group": int(s.group)}) + "\n"
                for s in samples)
    print(f"  {len(samples)} responses ({sum(s.correct for s in samples)} correct) in "
          f"{t_sample - t0:.0f} s; analysis forwards...", flush=True)
    try:
        model = load_model(model_dir, device=args.device)
    except (RuntimeError, AssertionError) as err:
        raise UserError(f"cannot load the model on device {args.device!r}: {err}") from None
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    n_layers, n_heads = text_config.num_hidden_layers, text_config.num_attention_heads
    sampled = config.resolve_layers(n_layers)
    capture_config = _replace(config, layers=list(range(n_layers)))
    eos = [t for t in {tokenizer.eos_token_id, tokenizer.pad_token_id} if t is not None]
    def progress(done, total):
        print(f"  forward batch {done}/{total} ({time.perf_counter() - t_sample:.0f} s)",
              flush=True)

    results = analyse_samples(model, samples, capture_config, eos, args.batch_tokens,
                              progress=progress)
    t_forward = time.perf_counter()
    labels = np.array([s.correct for s in samples])
    groups = np.array([s.group for s in samples])
    report = {"format": FORMAT,
              "model": str(args.model), "task": args.task, "responses_file": args.responses,
              "problems": len(set(groups.tolist())), "responses": len(samples),
              "correct": int(labels.sum()), "accuracy": float(labels.mean()),
              "mean_response_tokens": float(np.mean([len(s.response_ids) for s in samples])),
              "layers": n_layers, "heads": n_heads, "sampled_layers": sampled,
              "settings": {k: v for k, v in vars(args).items() if k not in ("func",)},
              "signal_config": {"window": config.window, "h_lo": config.h_lo,
                                "h_hi": "end" if config.h_hi is None else config.h_hi,
                                "q": config.q, "head_quantile": config.head_quantile}}
    heads = report_data.head_section(results, groups, sampled, config.head_quantile, args.seed)
    split = heads.pop("_split")
    report["heads"] = heads
    report["coupling"], signals, mask = report_data.coupling_section(
        results, groups, sampled, split, config, args.peak_fraction, args.k, args.permutations,
        args.bootstrap, args.seed, n_layers, config.head_quantile, args.position_bins,
        args.pair_pool)
    report["outcome"] = report_data.outcome_section(signals, mask, labels, groups, args.seed)
    both = labels.any() and not labels.all()
    if both:
        qk = report_data.qk_section(results, labels, groups, n_heads, args.qk_top_k,
                                    min(args.permutations, 2000), args.bootstrap, args.seed)
        report["qk_premise"] = report_data.premise_section(
            results, signals, mask, labels, groups, qk, n_heads, config.q, args.k, args.seed,
            min(args.permutations, 2000), args.bootstrap, args.position_bins, args.pair_pool)
        qk.pop("_order")
        report["qk"] = qk
    else:
        report["qk"] = {"skipped": f"{int(labels.sum())} of {labels.size} responses correct: "
                                   "AUC needs both correct and incorrect responses"}
    selected = report["qk"].get("held_out", {}).get("selected", [])
    report["receivers"] = report_data.receiver_section(
        results, groups, heads["global_heads"], selected,
        repeats=[s.repeated_sentences for s in samples], draws=args.bootstrap, seed=args.seed)
    report["examples"] = example_records(tokenizer, samples, results, signals, mask)
    report["seconds"] = {"sample": round(t_sample - t0, 1),
                         "forward": round(t_forward - t_sample, 1),
                         "statistics": round(time.perf_counter() - t_forward, 1),
                         **({"generate": round(info["generate_seconds"], 1)} if info else {})}
    report["reward"] = info.get("reward", "from file")
    return report


def _replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def run(args) -> int:
    from attnrl.analysis.report import render_report
    from attnrl.analysis.summary import summary_lines

    start = time.perf_counter()
    report = analyse(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report["seconds"]["total_before_render"] = round(time.perf_counter() - start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=_json_default))
    render_report(report, out)
    report["seconds"]["total"] = round(time.perf_counter() - start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=_json_default))
    for line in summary_lines(report):
        print(line)
    print(f"# wrote {out / 'report.json'}, {out / 'report.html'} "
          f"({report['seconds']['total']:.0f} s)")
    return 0


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
