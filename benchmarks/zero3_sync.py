"""Peak extra memory of one ZeRO-3 weight sync to the rollout engine: bucketed (what the
trainer does, trainers/weight_sync.py) against gathering every parameter at once and
cloning it (the trainer's sync before the change).

    python benchmarks/zero3_sync.py                 # 2 CPU processes (gloo), ~42 M params
    python benchmarks/zero3_sync.py --layers 4 --hidden 256 --vocab 8000    # smaller

A random Llama (fp32, untied embeddings) is saved once; each (mode) runs in its own
`torchrun --nproc_per_node 2` launch: every rank partitions the model with DeepSpeed ZeRO-3
(deepspeed.initialize, no optimizer: only the parameters matter here), loads an HF rollout
engine (attnrl HFEngine, its own full fp32 copy, memory-mapped from the file by
transformers, so written once before the baseline: part of the baseline, not of the sync),
resets its peak RSS (Linux VmHWM), runs one sync into the engine and reads the peak again.
`extra_rss_mb` = peak RSS during the sync - RSS before it (max over ranks). Modes:
`gather_all` the old sync; `bucketed` the trainer's; `bucketed_trim` the same with glibc's
`malloc_trim(0)` before each gather (measurement only: it shows how much of `bucketed`'s
RSS is freed buckets the C allocator kept, not memory the sync still holds). `peak_gathered_mb` = the largest sum of gathered (non-persistent)
ZeRO-3 parameters seen at any gather, counted from the parameters themselves. After the
measurement each rank checks the engine holds exactly the fully gathered weights.
Prints a table and writes benchmarks/results/zero3_sync.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import proc_status_mb, reset_peak_rss, write_result

ROOT = Path(__file__).resolve().parents[1]
MODES = ("gather_all", "bucketed", "bucketed_trim")


def save_model(out: Path, args) -> None:
    import torch

    from attnrl.models import build_tiny_model, build_tiny_tokenizer

    model = build_tiny_model("llama", num_heads=args.hidden // 64, head_dim=64,
                             num_layers=args.layers, intermediate_size=args.hidden * 11 // 4,
                             vocab_size=args.vocab, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    build_tiny_tokenizer().save_pretrained(out)


def worker(args) -> None:
    """One rank of one mode; writes REPORT/rank{R}.json."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch

    from attnrl.models import load_model
    from attnrl.rollout import make_engine
    from trainers.grpo import skip_cpu_shm_comm_op
    from trainers.weight_sync import WeightStream, gathered_bytes

    skip_cpu_shm_comm_op()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    model = load_model(args.model, dtype=torch.float32, device="cpu")
    ds_config = {"train_micro_batch_size_per_gpu": 1,
                 "zero_optimization": {"stage": 3}}
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    model = engine.module
    del engine
    rollout = make_engine("hf", args.model, batch_size=1, dtype=torch.float32, device="cpu")
    with torch.no_grad():  # the engine's weights come memory-mapped from the file: make them
        for tensor in rollout.model.state_dict().values():  # resident (written) before the
            tensor.mul_(1)                                  # baseline, as after a first sync

    peaks, rss = [], []
    context = deepspeed.zero.GatheredParameters
    enter = context.__enter__

    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    trim = args.mode == "bucketed_trim"

    def observed_enter(self):  # the real context, observed
        if trim:  # hand freed heap memory back first: live memory, not allocator retention
            libc.malloc_trim(0)
        result = enter(self)
        peaks.append(gathered_bytes(model))
        rss.append(proc_status_mb("VmRSS") - before)
        return result

    import gc

    gc.collect()
    libc.malloc_trim(0)
    torch.distributed.barrier()
    before = proc_status_mb("VmRSS")
    reset = reset_peak_rss()
    context.__enter__ = observed_enter
    start = time.perf_counter()
    if args.mode.startswith("bucketed"):
        stream = WeightStream(model, zero3=True)
        rollout.update_weights_stream(stream.names, stream.chunks())
        buckets = stream.stats.buckets
    else:  # the sync before the change: one gather of everything, a clone of each tensor
        with context(list(model.parameters())), torch.no_grad():
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        rollout.update_weights(state)
        del state
        buckets = 1
    seconds = time.perf_counter() - start
    peak = proc_status_mb("VmHWM")
    context.__enter__ = enter

    with context(list(model.parameters())), torch.no_grad():
        reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    held = rollout.model.state_dict()
    exact = sorted(held) == sorted(reference) and all(
        torch.equal(held[k], v) for k, v in reference.items())
    Path(args.report).mkdir(parents=True, exist_ok=True)
    (Path(args.report) / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "rss_before_mb": before, "peak_rss_mb": peak, "hwm_reset": reset,
        "extra_rss_mb": peak - before, "peak_gathered_mb": max(peaks, default=0) / 2**20,
        "rss_at_gathers_mb": rss, "gathers": len(peaks), "buckets": buckets, "seconds": seconds, "exact": exact}))


def run_mode(mode: str, model_dir: Path, tmp: Path) -> dict:
    report = tmp / f"report_{mode}"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", __file__, "--worker", "--mode", mode,
               "--model", str(model_dir), "--report", str(report)]
    log = tmp / f"{mode}.log"
    with open(log, "w") as handle:
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=handle,
                              stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"{mode}: exit code {code}\n{tail}")
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"mode": mode, "extra_rss_mb": max(r["extra_rss_mb"] for r in ranks),
            "peak_gathered_mb": max(r["peak_gathered_mb"] for r in ranks),
            "buckets": ranks[0]["buckets"], "seconds": max(r["seconds"] for r in ranks),
            "exact": all(r["exact"] for r in ranks), "ranks": ranks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zero3_sync.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from safetensors import safe_open

    with tempfile.TemporaryDirectory(prefix="attnrl-zero3-sync-") as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "model"
        save_model(model_dir, args)
        sizes = {}
        with safe_open(model_dir / "model.safetensors", "pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (safe_open has no __iter__)
                tensor = handle.get_slice(key)
                numel = 1
                for dim in tensor.get_shape():
                    numel *= dim
                sizes[key] = numel * 4  # float32
        model_mb, largest_mb = sum(sizes.values()) / 2**20, max(sizes.values()) / 2**20
        rows = [run_mode(mode, model_dir, tmp) for mode in MODES]
    print(f"model: Llama, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
          f"fp32: {sum(sizes.values()) // 4 / 1e6:.1f} M params, {model_mb:.1f} MiB; "
          f"largest tensor {largest_mb:.1f} MiB; 2 ranks (ZeRO-3, gloo, CPU)")
    print(f"{'mode':<13} {'buckets':>7} {'peak gathered MiB':>18} {'extra RSS MiB':>14} "
          f"{'x model':>8} {'seconds':>8} {'exact':>6}")
    for r in rows:
        print(f"{r['mode']:<13} {r['buckets']:>7} {r['peak_gathered_mb']:>18.1f} "
              f"{r['extra_rss_mb']:>14.1f} {r['extra_rss_mb'] / model_mb:>8.2f} "
              f"{r['seconds']:>8.2f} {r['exact']!s:>6}")
    write_result(args.out, {
        "benchmark": "zero3_sync", "model": {"layers": args.layers, "hidden": args.hidden,
                                              "vocab": args.vocab, "dtype": "float32",
                                              "model_mb": model_mb,
                                              "largest_tensor_mb": largest_mb},
        "processes": 2, "machine": platform.platform(), "cpu_count": os.cpu_count(),
        "rows": rows})


if __name__ == "__main__":
    main()
