"""Cost of attention credit in a training step: coupled vs uniform on the same rollouts.

    python benchmarks/step_overhead.py            # SmolLM2, completions of 256 and 1024 tokens
    python benchmarks/step_overhead.py --quick    # 64 and 128 tokens, fewer repeats

One update = the loss forward (with the signal capture for `coupled`) + backward, on the
same fixed batch of rollouts, through AttnGRPOTrainer.compute_loss. Each (strategy, length)
runs in its own process so its peak memory is clean: peak RSS (VmHWM) on CPU,
torch.cuda.max_memory_allocated on GPU. Time is the median of the repeats after a warm-up:
on CPU process CPU time (robust to other processes on a shared machine; wall time is in
the JSON too), on GPU wall time after synchronising. The signal path the capture took
(`signals/path_*` metrics) is recorded.
Prints a table and writes benchmarks/results/step_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import proc_status_mb, write_result

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
        use_cpu=device == "cpu", bf16=args.bf16, save_strategy="no")
    trainer = AttnGRPOTrainer(model=model, reward_funcs=[lambda prompts, completions, **_:
                                                         [0.0] * len(completions)],
                              args=config, train_dataset=Dataset.from_list([{"prompt": "x"}]),
                              processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
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
    times, walls = [], []
    for i in range(args.repeats + 1):
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        loss = trainer.compute_loss(model, dict(inputs))
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first run is a warm-up
            walls.append(time.perf_counter() - start)
            times.append(walls[-1] if device == "cuda" else time.process_time() - cpu)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else proc_status_mb("VmHWM"))
    paths = {k: v[-1] for k, v in trainer._metrics["train"].items()
             if k.startswith("signals/path_")}
    return {"strategy": args.strategy, "length": args.length, "step_s": statistics.median(times),
            "times_s": times, "wall_s": walls, "peak_mb": peak, "device": device,
            "signal_paths": paths,
            "signals_s": trainer._metrics["train"].get("time/signals", [0])[-1]}


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
    parser.add_argument("--quick", action="store_true")
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

    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    for length in args.lengths:
        for strategy in args.strategies:
            cmd = [sys.executable, __file__, "--worker", "--strategy", strategy, "--length",
                   str(length), "--model", args.model, "--batch", str(args.batch),
                   "--prompt-length", str(args.prompt_length), "--repeats", str(args.repeats),
                   "--checkpointing" if args.checkpointing else "--no-checkpointing"]
            if args.bf16:
                cmd.append("--bf16")
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not line:
                raise SystemExit(f"worker failed ({strategy}, {length}):\n{out.stderr[-3000:]}")
            rows.append(json.loads(line[-1][7:]))
            print(f"  {strategy:>10} @ {length:5d} tokens: {rows[-1]['step_s']:.3f} s", flush=True)

    base = {r["length"]: r for r in rows if r["strategy"] == "uniform"}
    print(f"\n{'strategy':<12}{'tokens':>7}{'step s':>9}{'signals s':>11}{'peak MB':>10}"
          f"{'time x':>8}{'mem x':>8}")
    for r in rows:
        ref = base.get(r["length"])
        r["time_ratio"] = r["step_s"] / ref["step_s"] if ref else None
        r["memory_ratio"] = r["peak_mb"] / ref["peak_mb"] if ref else None
        print(f"{r['strategy']:<12}{r['length']:>7}{r['step_s']:>9.3f}{r['signals_s']:>11.3f}"
              f"{r['peak_mb']:>10.0f}{r['time_ratio'] or 0:>8.3f}{r['memory_ratio'] or 0:>8.3f}")
    print("target: coupled / uniform step time <= 1.02 (gradient checkpointing on)")
    result = {"model": args.model, "batch": args.batch, "prompt_length": args.prompt_length,
              "gradient_checkpointing": args.checkpointing, "bf16": args.bf16,
              "threads": os.environ.get("OMP_NUM_THREADS"), "machine": platform.machine(),
              "command": " ".join(sys.argv),
              "time_method": "median of repeats after a warm-up; CPU: process CPU time, "
                             "GPU: synchronised wall time",
              "rows": rows}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
