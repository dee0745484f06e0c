"""Attention-signal cost: the fast capture vs a plain sdpa forward vs the eager reference.

    python benchmarks/signals.py            # SmolLM2-135M, N = 512, 1024, 2048, 4096
    python benchmarks/signals.py --quick    # N = 256, 512, one repetition
    python benchmarks/signals.py --lengths 4096 8192 16384 --reps 1
    python benchmarks/signals.py --device cuda --dtype bfloat16 --model smollm2-shape \
        --lengths 4096 8192 16384           # GPU (what benchmarks/gpu_check.sh runs)

One sequence of N tokens of GSM8K text (prompt = first quarter, response = the rest),
one CPU thread (CPU), default SignalConfig (5 layers, W = 10, h_lo 10, h_hi 100).
`--model smollm2-shape`: SmolLM2-135M's architecture with random weights and random
tokens (no weights or tokenizer needed; the cost does not depend on the weights).
`--dtype`: the model's weights (float32 or bfloat16).

Time: best of --reps runs (modes interleaved); CPU: process CPU time (robust to other
processes on a shared machine; wall time is in the JSON too); CUDA: wall time after
synchronising. Each capture mode is compared with the plain forward of the same kind:
  plain            model forward with sdpa (no_grad, use_cache=False)
  capture          the same forward inside SignalCapture + token_signals() (CPU float32:
                   the fused path; otherwise sdpa + the statistics kernel)
  portable         the same with use_kernel=False (blockwise log-sum-exp pass)
  ckpt_plain       training forward (grad on, train mode, gradient checkpointing)
  ckpt_capture     the same inside SignalCapture (CPU float32: the fused path, one kernel
                   call for output, lse and span, which the backward's recompute replays;
                   otherwise sdpa + the statistics kernel)
  autocast_plain   no_grad forward under torch.autocast(bfloat16) (a trainer's bf16)
  autocast_capture the same inside SignalCapture (path: sdpa + statistics kernel)
  signals          compute_token_signals (forward stopped after the last sampled layer)
  reference        eager forward with output_attentions + literal definitions (one run)
The path each capture mode took (`SignalCapture.paths`) is in the JSON.
Memory (CPU): torch.profiler(profile_memory=True) memory timeline, which logs every CPU tensor
allocation and free with the tensor's identity. Per mode: the peak of live bytes over the
call (relative to its start). For the capture also the peak of live bytes of the tensors
created inside its own profiler regions (its temporaries and stored statistics, plus, on
the fused-kernel path, the padded q/k/v and the sampled layers' attention output, which
replace sdpa's own): an upper bound of its extra memory, compared with the eager maps of
the sampled layers
(5 x H x N^2 x 4 bytes, the least a map-based method holds). The reference is skipped
where its maps (output_attentions keeps every layer) would not fit in 70% of the
available memory. Memory (CUDA): peak allocated bytes of each call above the bytes held
before it (torch.cuda.max_memory_allocated); the capture's own = its mode's peak minus
the plain mode's of the same kind.

Prints a table and writes benchmarks/results/signals.json.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from _common import write_result

os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODES = ["plain", "capture", "portable", "ckpt_plain", "ckpt_capture", "autocast_plain",
         "autocast_capture", "signals"]
PAIRS = {"capture": "plain", "portable": "plain", "ckpt_capture": "ckpt_plain",
         "autocast_capture": "autocast_plain"}   # capture mode -> its plain forward
LAST_PATHS = {}                                     # mode -> paths of its last run


def smollm2_shape(dtype, device, length):
    """SmolLM2-135M's architecture (30 layers, 9 heads / 3 KV heads of 64, hidden 576)
    with random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, max_position_embeddings=max(8192, length),
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                         tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).eval()


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def gsm8k_tokens(tokenizer, n: int):
    """input_ids (1, n): GSM8K questions and answers, concatenated."""
    import torch

    from attnrl.data import gsm8k_path

    ids = []
    for line in gsm8k_path("test").read_text().splitlines():
        record = json.loads(line)
        ids += tokenizer(record["question"] + "\n" + record["answer"] + "\n\n",
                         add_special_tokens=False)["input_ids"]
        if len(ids) >= n:
            break
    return torch.tensor([ids[:n]])


def first(input_ids, n: int):
    """The first n tokens as a batch: input_ids, attention_mask, response_mask."""
    import torch

    ids = input_ids[:, :n]
    response = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    response[0, n // 4:] = True
    return ids, torch.ones_like(ids), response


def run_mode(mode, model, ids, attention, response, config):
    import contextlib

    import torch

    from attnrl.signals import SignalCapture, compute_token_signals
    from attnrl.signals.reference import reference_token_signals

    device = ids.device.type
    kind, what = mode.split("_") if "_" in mode else \
        ("plain", "capture" if mode in ("capture", "portable") else mode)
    grad = kind == "ckpt"
    autocast = torch.autocast(device, dtype=torch.bfloat16) if kind == "autocast" \
        else contextlib.nullcontext()
    if grad:
        model.train()
        model.gradient_checkpointing_enable()
    try:
        with torch.set_grad_enabled(grad), autocast:
            if mode == "signals":
                compute_token_signals(model, ids, attention, response, config)
            elif mode == "reference":
                reference_token_signals(model, ids, attention, response, config)
            elif what == "plain":
                model(input_ids=ids, attention_mask=attention, use_cache=False)
            elif what == "capture":
                with SignalCapture(model, config, response_mask=response,
                                   use_kernel=mode != "portable") as capture:
                    model(input_ids=ids, attention_mask=attention, use_cache=False)
                capture.token_signals()
                LAST_PATHS[mode] = sorted(set(capture.paths.values()))
            else:
                raise ValueError(mode)
    finally:
        if grad:
            model.gradient_checkpointing_disable()
            model.eval()
    if device == "cuda":
        torch.cuda.synchronize()


def measure_time(batch, modes, reps):
    """{mode: (best CPU seconds, best wall seconds)}."""
    import torch

    best = {m: (float("inf"), float("inf")) for m in modes}
    cuda = batch[1].device.type == "cuda"
    for _ in range(reps):
        for mode in modes:
            if cuda:
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            run_mode(mode, *batch)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if cuda:
                cpu = wall  # CPU time says nothing about GPU kernels
            best[mode] = (min(best[mode][0], cpu), min(best[mode][1], wall))
    return best


def cuda_peak(mode, batch):
    """Peak allocated CUDA bytes of one call above what was allocated before it."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run_mode(mode, *batch)
    return torch.cuda.max_memory_allocated() - before


def memory_profile(mode, batch):
    """(peak live bytes of the call, peak live bytes of the tensors created inside the
    capture's profiler regions), from the profiler's memory timeline (tensor identities)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, TensorKey

    from attnrl.signals.capture import PROFILE_REGION

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        run_mode(mode, *batch)
    regions = [(e.start_ns(), e.start_ns() + e.duration_ns())
               for e in prof.profiler.kineto_results.events() if e.name() == PROFILE_REGION]
    live = peak = own = own_peak = 0
    owned = {}
    for stamp, action, (key, _), size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
            peak = max(peak, live)
            if isinstance(key, TensorKey) and any(a <= stamp <= b for a, b in regions):
                owned[key] = size
                own += size
                own_peak = max(own_peak, own)
        elif action == Action.DESTROY:
            live -= size
            own -= owned.pop(key, 0)
    return peak, own_peak


def _mb(value):
    return None if value is None else round(value / 2**20, 1)


def measure(n, model, input_ids, config, reps, modes, memory=True):
    text = model.config
    heads, n_layers = text.num_attention_heads, text.num_hidden_layers
    sampled = len(config.resolve_layers(n_layers))
    batch = (model, *first(input_ids, n), config)
    cuda = input_ids.device.type == "cuda"
    times = measure_time(batch, modes, reps)
    maps_sampled = sampled * heads * n * n * 4
    maps_all = n_layers * heads * n * n * 4
    row = {"n": n}
    for mode in modes:
        row[f"{mode}_s"] = round(times[mode][0], 3)
        row[f"{mode}_wall_s"] = round(times[mode][1], 3)
        if mode in LAST_PATHS:
            row[f"{mode}_paths"] = LAST_PATHS[mode]
    for mode, plain in PAIRS.items():
        if mode in modes and plain in modes:
            row[f"{mode}_over_plain"] = round(times[mode][0] / times[plain][0], 3)
    row["eager_maps_sampled_mb"] = _mb(maps_sampled)
    row["eager_maps_all_layers_mb"] = _mb(maps_all)
    for mode, plain in PAIRS.items():
        if mode not in modes or plain not in modes or not memory:
            continue
        if cuda:
            own = max(0, cuda_peak(mode, batch) - cuda_peak(plain, batch))
        else:
            own = memory_profile(mode, batch)[1]
        row[f"{mode}_own_peak_mb"] = _mb(own)
        row[f"{mode}_own_over_sampled_maps"] = round(own / maps_sampled, 4)
    row["reference_s"] = row["reference_note"] = None
    if "reference" in modes and not cuda and maps_all * 1.5 < 0.7 * available_bytes():
        row["reference_s"] = round(measure_time(batch, ["reference"], 1)["reference"][0], 3)
    elif "reference" in modes:
        row["reference_note"] = (f"skipped: eager maps of all {n_layers} layers need "
                                 f"{maps_all / 2**30:.1f} GiB")
    return row


def print_table(rows, modes):
    pairs = [(m, p) for m, p in PAIRS.items() if m in modes and p in modes]
    header = f"{'N':>6}" + "".join(f"{m:>18}" for m, _ in pairs)
    print("\ntime of each capture mode / its plain forward (memory: own peak / eager maps of "
          "the sampled layers)\n" + header)
    for r in rows:
        cells = [f"{r[m + '_over_plain']:.3f}x "
                 + (f"{100 * r[m + '_own_over_sampled_maps']:.2f}%"
                    if m + "_own_over_sampled_maps" in r else "-") for m, _ in pairs]
        print(f"{r['n']:>6}" + "".join(f"{c:>18}" for c in cells))
    print("targets: <= 1.03x the plain forward; memory <= 1% of the eager maps at 16K")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--modes", nargs="+", default=MODES + ["reference"],
                        choices=MODES + ["reference"])
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure each capture mode's own memory (one more run each)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "signals.json"))
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.reps = [256, 512], 1

    import torch

    from attnrl.signals import SignalConfig

    if args.device == "cpu":
        torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    if args.model == "smollm2-shape":
        model = smollm2_shape(dtype, args.device, max(args.lengths))
        input_ids = torch.randint(10, model.config.vocab_size, (1, max(args.lengths)),
                                  generator=torch.Generator().manual_seed(0))
    else:
        from attnrl.models import load_model, load_tokenizer

        model = load_model(args.model).to(args.device, dtype)
        input_ids = gsm8k_tokens(load_tokenizer(args.model), max(args.lengths))
    input_ids = input_ids.to(args.device)
    config = SignalConfig()
    modes = [m for m in args.modes if m != "reference"]
    for mode in modes:                                                   # warm-up
        run_mode(mode, model, *first(input_ids, 64), config)
    rows = []
    for n in args.lengths:
        rows.append(measure(n, model, input_ids, config, args.reps, args.modes, args.memory))
        print(f"N={n}: " + ", ".join(f"{m} {rows[-1][m + '_over_plain']}x"
                                     for m in PAIRS if m + "_over_plain" in rows[-1]),
              flush=True)
        write_result(args.out, result_json(args, model, config, rows))  # after each length
    print_table(rows, args.modes)


def result_json(args, model, config, rows) -> dict:
    import torch

    return {"model": args.model, "dtype": args.dtype, "device": args.device,
            "threads": torch.get_num_threads() if args.device == "cpu" else None,
            "batch": 1, "command": " ".join(sys.argv),
            "reps": args.reps, "config": "SignalConfig() defaults",
            "sampled_layers": config.resolve_layers(model.config.num_hidden_layers),
            "machine": platform.processor() or platform.machine(),
            "time_method": ("best-of-reps process CPU time (wall time also given)"
                            if args.device == "cpu" else "best-of-reps wall time, synchronised"),
            "memory_method": "CPU: torch.profiler(profile_memory=True) memory timeline: peak "
                             "live bytes of tensors created inside the capture's profiler "
                             "regions; CUDA: peak allocated above the start, capture mode "
                             "minus its plain mode",
            "rows": rows}

if __name__ == "__main__":
    main()
