"""Peak extra memory of one ZeRO-3 weight sync to the rollout engine: bucketed (what the
trainer does, trainers/weight_sync.py) against gathering every parameter at once and
cloning it (the trainer's sync before the change).

    python benchmarks/zero3_sync.py                 # 2 CPU processes (gloo), 8, 16, 32 layers
    python benchmarks/zero3_sync.py --layers 4,8 --hidden 256 --vocab 8000   # smaller

Model sizes: one per `--layers` value, all with the same widths and vocabulary, so the
largest tensor (the embedding, and the untied lm_head) is the same and only the model
grows: a sync whose extra memory is bounded by its largest bucket stays flat across them.
For each size a random Llama (fp32, untied embeddings) is saved once; each mode runs in its own
`torchrun --nproc_per_node 2` launch: every rank partitions the model with DeepSpeed ZeRO-3
(deepspeed.initialize, no optimizer: only the parameters matter here), loads an HF rollout
engine (attnrl HFEngine, its own full fp32 copy, memory-mapped from the file by
transformers, so written once before the baseline: part of the baseline, not of the sync),
resets its peak RSS (Linux VmHWM), runs one sync into the engine and reads the peak again.
`extra_rss_mb` = peak RSS during the sync - RSS before it (max over ranks); `kept_rss_mb` =
RSS after the sync - RSS before it. Modes: `gather_all` the sync before bucketing (one
gather of everything, a clone of each tensor); `bucketed_keep_heap` the bucketed sync as
first built (trainers.weight_sync.release_cpu_heap disabled: glibc keeps each released
bucket in its heap); `bucketed` the trainer's sync now (on CPU each released bucket's heap
is handed back, glibc `malloc_trim(0)`). `peak_gathered_mb` = the largest sum of gathered (non-persistent)
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
MODES = ("gather_all", "bucketed_keep_heap", "bucketed")


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
    from trainers import weight_sync
    from trainers.grpo_config import skip_cpu_shm_comm_op
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
    if args.mode == "bucketed_keep_heap":  # the bucketed sync before the heap hand-back
        weight_sync.release_cpu_heap = lambda: False

    def observed_enter(self):  # the real context, observed
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
    peak, kept = proc_status_mb("VmHWM"), proc_status_mb("VmRSS") - before
    context.__enter__ = enter

    with context(list(model.parameters())), torch.no_grad():
        reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    held = rollout.model.state_dict()
    exact = sorted(held) == sorted(reference) and all(
        torch.equal(held[k], v) for k, v in reference.items())
    Path(args.report).mkdir(parents=True, exist_ok=True)
    (Path(args.report) / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "rss_before_mb": before, "peak_rss_mb": peak, "hwm_reset": reset,
        "extra_rss_mb": peak - before, "kept_rss_mb": kept,
        "peak_gathered_mb": max(peaks, default=0) / 2**20,
        "rss_at_gathers_mb": rss, "gathers": len(peaks), "buckets": buckets, "seconds": seconds, "exact": exact}))


def run_mode(mode: str, model_dir: Path, tmp: Path) -> dict:
    report = tmp / f"report_{model_dir.name}_{mode}"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", __file__, "--worker", "--mode", mode,
               "--model", str(model_dir), "--report", str(report)]
    log = tmp / f"{model_dir.name}_{mode}.log"
    with open(log, "w") as handle:
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=handle,
                              stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"{mode}: exit code {code}\n{tail}")
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"mode": mode, "extra_rss_mb": max(r["extra_rss_mb"] for r in ranks),
            "kept_rss_mb": max(r["kept_rss_mb"] for r in ranks),
            "peak_gathered_mb": max(r["peak_gathered_mb"] for r in ranks),
            "buckets": ranks[0]["buckets"], "seconds": max(r["seconds"] for r in ranks),
            "exact": all(r["exact"] for r in ranks), "ranks": ranks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="8,16,32",
                        help="comma-separated layer counts, one model size each")
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

    layer_counts = [int(x) for x in str(args.layers).split(",")]
    sizes = []
    with tempfile.TemporaryDirectory(prefix="attnrl-zero3-sync-") as tmp:
        tmp = Path(tmp)
        for layers in layer_counts:
            model_dir = tmp / f"model{layers}"
            save_model(model_dir, argparse.Namespace(**{**vars(args), "layers": layers}))
            nbytes = []
            with safe_open(model_dir / "model.safetensors", "pt") as handle:
                for key in handle.keys():  # noqa: SIM118  (safe_open has no __iter__)
                    numel = 1
                    for dim in handle.get_slice(key).get_shape():
                        numel *= dim
                    nbytes.append(numel * 4)  # float32
            model = {"layers": layers, "hidden": args.hidden, "vocab": args.vocab,
                     "dtype": "float32", "params_m": sum(nbytes) / 4 / 1e6,
                     "model_mb": sum(nbytes) / 2**20, "largest_tensor_mb": max(nbytes) / 2**20}
            rows = [run_mode(mode, model_dir, tmp) for mode in MODES]
            sizes.append({"model": model, "rows": rows})
    print(f"Llama, hidden {args.hidden}, vocab {args.vocab}, fp32; 2 ranks (ZeRO-3, gloo, "
          f"CPU); extra RSS = peak during one sync - before, max over ranks")
    print(f"{'layers':>6} {'model MiB':>9} {'largest MiB':>11} {'mode':<18} {'buckets':>7} "
          f"{'gathered MiB':>12} {'extra RSS MiB':>13} {'x model':>7} {'x largest':>9} "
          f"{'kept MiB':>8} {'seconds':>7} {'exact':>5}")
    for size in sizes:
        m = size["model"]
        for r in size["rows"]:
            print(f"{m['layers']:>6} {m['model_mb']:>9.1f} {m['largest_tensor_mb']:>11.1f} "
                  f"{r['mode']:<18} {r['buckets']:>7} {r['peak_gathered_mb']:>12.1f} "
                  f"{r['extra_rss_mb']:>13.1f} {r['extra_rss_mb'] / m['model_mb']:>7.2f} "
                  f"{r['extra_rss_mb'] / m['largest_tensor_mb']:>9.2f} "
                  f"{r['kept_rss_mb']:>8.1f} {r['seconds']:>7.2f} {r['exact']!s:>5}")
    write_result(args.out, {
        "benchmark": "zero3_sync", "processes": 2, "machine": platform.platform(),
        "cpu_count": os.cpu_count(), "sizes": sizes})

if __name__ == "__main__":
    main()
