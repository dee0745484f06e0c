"""Cost of attention credit in a training step: coupled vs uniform on the same rollouts,
and the step's peak memory against completion length.

    python benchmarks/step_overhead.py            # SmolLM2, completions of 256 and 1024 tokens
    python benchmarks/step_overhead.py --quick    # 64 and 128 tokens, fewer repeats
    python benchmarks/step_overhead.py --long     # 1024, 4096 and 8192 tokens (time + memory)
    python benchmarks/step_overhead.py --lengths 1024 4096 8192 --repeats 1 --no-warmup \
        --out benchmarks/results/step_overhead_memory.json     # peak memory only, one step

One update = the loss forward (with the signal capture for `coupled`) + backward, on the
same fixed batch of rollouts (batch x (prompt + completion) tokens, ragged completions),
through AttnGRPOTrainer.compute_loss, gradient checkpointing on (TRL's default). Each
(strategy, length) runs in its own process. Peak memory covers the steps only: CPU peak
RSS (VmHWM, reset after the model is loaded and the batch built, so the model load's own
transient peak is not counted), GPU torch.cuda.max_memory_allocated (reset likewise);
`step_mb` = that peak minus the memory held before the first step (the model's weights;
each step starts with its gradients freed). `full_logits_mb` is what the float32 (batch x
tokens x vocabulary) logits would take if a step held them: it does not, TRL's fused LM head
computes log-probs and entropies in tiles of tokens x vocabulary (tests/trainers/
test_grpo_logprobs.py). Time is the median of the repeats after a warm-up (`--no-warmup`:
none): on CPU process CPU time (robust to other processes on a shared machine; wall time
is in the JSON too), on GPU wall time after synchronising. The signal path the capture
took (`signals/path_*` metrics) is recorded. A worker that fails (e.g. out of memory) is
recorded with its error and the others still run.
Prints a table and writes benchmarks/results/step_overhead.json (after every row).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import proc_status_mb, reset_peak_rss, write_result

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> dict:
    """One (strategy, completion length) measurement in this process."""
    import torch
    from datasets import Dataset

    from attnrl.models import load_model, load_tokenizer
    from trainers.grpo import AttnGRPOConfig, AttnGRPOTrainer

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32,
                       device=device)
    tokenizer = load_tokenizer(args.model)
    config = AttnGRPOConfig(
        output_dir="/tmp/attnrl-step-overhead", credit=args.strategy, report_to="none",
        per_device_train_batch_size=args.batch, num_generations=args.batch,
        max_completion_length=args.length, gradient_checkpointing=args.checkpointing,
        use_cpu=device == "cpu", bf16=args.bf16, save_strategy="no", rollout_engine="hf")
    trainer = AttnGRPOTrainer(model=model, reward_funcs=[lambda prompts, completions, **_:
                                                         [0.0] * len(completions)],
                              args=config, train_dataset=Dataset.from_list([{"prompt": "x"}]),
                              processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    if args.checkpointing:  # Trainer.train() enables it; building the trainer does not
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=config.gradient_checkpointing_kwargs or None)
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    prompt = torch.randint(10, vocab, (args.batch, args.prompt_length), generator=g)
    completion = torch.randint(10, vocab, (args.batch, args.length), generator=g)
    completion_mask = torch.ones_like(completion)
    for row in range(args.batch):  # ragged responses, as real rollouts are
        completion_mask[row, args.length - row * args.length // (2 * args.batch):] = 0
    inputs = {"prompt_ids": prompt.to(device), "prompt_mask": torch.ones_like(prompt).to(device),
              "completion_ids": completion.to(device),
              "completion_mask": completion_mask.to(device),
              "advantages": torch.linspace(-1, 1, args.batch, device=device),
              "num_items_in_batch": completion_mask.sum().to(device)}
    model.train()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        reset = reset_peak_rss()
        base = proc_status_mb("VmRSS")
    times, walls = [], []
    warmup = 1 if args.warmup else 0
    for i in range(args.repeats + warmup):
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        loss = trainer.compute_loss(model, dict(inputs))
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:  # the first run is a warm-up
            walls.append(time.perf_counter() - start)
            times.append(walls[-1] if device == "cuda" else time.process_time() - cpu)
    if device == "cuda":
        peak, method = torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    else:
        peak = proc_status_mb("VmHWM")
        method = "peak RSS over the steps" if reset else "peak RSS of the process (no reset)"
    paths = {k: v[-1] for k, v in trainer._metrics["train"].items()
             if k.startswith("signals/path_")}
    tokens = args.batch * (args.prompt_length + args.length)
    return {"strategy": args.strategy, "length": args.length, "step_s": statistics.median(times),
            "times_s": times, "wall_s": walls, "peak_mb": round(peak, 1),
            "before_step_mb": round(base, 1), "step_mb": round(peak - base, 1),
            "memory_method": method, "tokens": tokens,
            "full_logits_mb": round(tokens * vocab * 4 / 2**20, 1), "device": device,
            "gradient_checkpointing": bool(model.is_gradient_checkpointing),
            "lm_head_tile_tokens": lm_head_tile_tokens(), "signal_paths": paths,
            "signals_s": trainer._metrics["train"].get("time/signals", [0])[-1]}


def lm_head_tile_tokens() -> int | None:
    """Tokens per tile of TRL's fused LM head in force (trainers/fused_head.py)."""
    try:
        import trl.kernels.chunked_logprob as chunked
    except ImportError:
        return None
    return getattr(chunked, "TOKEN_CHUNK_SIZE", None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--strategies", nargs="+", default=["uniform", "coupled"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="gradient checkpointing (TRL's GRPO default: on)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="one unmeasured step first (off: memory-only runs at long lengths)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--long", action="store_true",
                        help="completions of 1024, 4096 and 8192 tokens, 2 repeats")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                             "step_overhead.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    if args.quick:
        args.lengths, args.repeats = [64, 128], 2
    if args.long:
        args.lengths, args.repeats = [1024, 4096, 8192], 2

    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    for length in args.lengths:
        for strategy in args.strategies:
            cmd = [sys.executable, __file__, "--worker", "--strategy", strategy, "--length",
                   str(length), "--model", args.model, "--batch", str(args.batch),
                   "--prompt-length", str(args.prompt_length), "--repeats", str(args.repeats),
                   "--checkpointing" if args.checkpointing else "--no-checkpointing"]
            cmd.append("--warmup" if args.warmup else "--no-warmup")
            if args.bf16:
                cmd.append("--bf16")
            start = time.perf_counter()
            out = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not line:
                error = (f"worker exit {out.returncode}"
                         + (" (killed: out of memory?)" if out.returncode in (-9, 137) else "")
                         + f": {out.stderr[-1500:]}")
                rows.append({"strategy": strategy, "length": length, "error": error})
                print(f"  {strategy:>10} @ {length:5d} tokens: FAILED {error[:300]}", flush=True)
            else:
                rows.append(json.loads(line[-1][7:]))
                print(f"  {strategy:>10} @ {length:5d} tokens: {rows[-1]['step_s']:.3f} s, "
                      f"peak {rows[-1]['peak_mb']:.0f} MB "
                      f"({time.perf_counter() - start:.0f} s with load)", flush=True)
            write_result(args.out, result_json(args, ratios(rows)))
    print_table(ratios(rows))


def ratios(rows: list[dict]) -> list[dict]:
    """Each row's time and memory over the uniform row of its length (None: no such row)."""
    base = {r["length"]: r for r in rows if r["strategy"] == "uniform" and "error" not in r}
    for r in rows:
        ref = base.get(r["length"])
        ok = ref is not None and "error" not in r
        r["time_ratio"] = r["step_s"] / ref["step_s"] if ok else None
        r["memory_ratio"] = r["peak_mb"] / ref["peak_mb"] if ok else None
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'strategy':<12}{'tokens':>7}{'step s':>9}{'signals s':>11}{'peak MB':>10}"
          f"{'step MB':>9}{'logits MB':>11}{'time x':>8}{'mem x':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['strategy']:<12}{r['length']:>7}  failed: {r['error'][:60]}")
            continue
        print(f"{r['strategy']:<12}{r['length']:>7}{r['step_s']:>9.3f}{r['signals_s']:>11.3f}"
              f"{r['peak_mb']:>10.0f}{r['step_mb']:>9.0f}{r['full_logits_mb']:>11.0f}"
              f"{r['time_ratio'] or 0:>8.3f}{r['memory_ratio'] or 0:>8.3f}")
    print("target: coupled / uniform step time <= 1.02 (gradient checkpointing on); "
          "logits MB: the full float32 logits no step holds")


def result_json(args, rows: list[dict]) -> dict:
    return {"model": args.model, "batch": args.batch, "prompt_length": args.prompt_length,
            "gradient_checkpointing": args.checkpointing, "bf16": args.bf16,
            "threads": os.environ.get("OMP_NUM_THREADS"), "machine": platform.machine(),
            "command": " ".join(sys.argv), "repeats": args.repeats, "warmup": args.warmup,
            "time_method": "median of repeats after a warm-up; CPU: process CPU time, "
                           "GPU: synchronised wall time",
            "memory_method": "peak over the steps only (CPU: VmHWM reset before the first "
                             "step; GPU: max_memory_allocated reset); step_mb = peak minus "
                             "the memory held before the first step",
            "rows": rows}


if __name__ == "__main__":
    main()
