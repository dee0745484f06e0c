"""Attention-signal cost: the fast capture vs a plain sdpa forward vs the eager reference.

    python benchmarks/signals.py            # SmolLM2-135M, N = 512, 1024, 2048, 4096
    python benchmarks/signals.py --quick    # N = 256, 512, one repetition

One sequence of N tokens of GSM8K text (prompt = first quarter, response = the rest),
float32, one CPU thread, default SignalConfig (5 layers, W = 10, h_lo 10, h_hi 100).

Time: best of --reps runs (modes interleaved), process CPU time (robust to other
processes on a shared machine; wall time is in the JSON too) of
  plain      model forward with sdpa (no_grad, use_cache=False)
  capture    the same forward inside SignalCapture + token_signals() (fused CPU kernel)
  portable   the same with use_kernel=False (blockwise log-sum-exp pass, any device)
  signals    compute_token_signals (forward stopped after the last sampled layer)
  reference  eager forward with output_attentions + literal definitions (one run)
Memory: torch.profiler(profile_memory=True) memory timeline, which logs every CPU tensor
allocation and free with the tensor's identity. Per mode: the peak of live bytes over the
call (relative to its start). For the capture also the peak of live bytes of the tensors
created inside its own profiler regions (its temporaries and stored statistics, plus, on
the fused-kernel path, the padded q/k/v and the sampled layers' attention output, which
replace sdpa's own): an upper bound of its extra memory, compared with the eager maps of
the sampled layers
(5 x H x N^2 x 4 bytes, the least a map-based method holds). The reference is skipped
where its maps (output_attentions keeps every layer) would not fit in 70% of the
available memory.

Prints a table and writes benchmarks/results/signals.json.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

from _common import write_result

from attnrl.data import gsm8k_path

os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GSM8K = gsm8k_path("test")
MODES = ["plain", "capture", "portable", "signals"]


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def gsm8k_tokens(tokenizer, n: int):
    """input_ids (1, n): GSM8K questions and answers, concatenated."""
    import torch

    ids = []
    for line in GSM8K.read_text().splitlines():
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
    response = torch.zeros(ids.shape, dtype=torch.bool)
    response[0, n // 4:] = True
    return ids, torch.ones_like(ids), response


def run_mode(mode, model, ids, attention, response, config):
    import torch

    from attnrl.signals import SignalCapture, compute_token_signals
    from attnrl.signals.reference import reference_token_signals

    with torch.no_grad():
        if mode == "plain":
            model(input_ids=ids, attention_mask=attention, use_cache=False)
        elif mode in ("capture", "portable"):
            with SignalCapture(model, config, response_mask=response,
                               use_kernel=mode == "capture") as capture:
                model(input_ids=ids, attention_mask=attention, use_cache=False)
            capture.token_signals()
        elif mode == "signals":
            compute_token_signals(model, ids, attention, response, config)
        elif mode == "reference":
            reference_token_signals(model, ids, attention, response, config)
        else:
            raise ValueError(mode)


def measure_time(batch, modes, reps):
    """{mode: (best CPU seconds, best wall seconds)}."""
    best = {m: (float("inf"), float("inf")) for m in modes}
    for _ in range(reps):
        for mode in modes:
            wall, cpu = time.perf_counter(), time.process_time()
            run_mode(mode, *batch)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            best[mode] = (min(best[mode][0], cpu), min(best[mode][1], wall))
    return best


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


def measure(n, model, input_ids, config, reps):
    text = model.config
    heads, n_layers = text.num_attention_heads, text.num_hidden_layers
    sampled = len(config.resolve_layers(n_layers))
    batch = (model, *first(input_ids, n), config)
    times = measure_time(batch, MODES, reps)
    plain_peak, _ = memory_profile("plain", batch)
    capture_peak, capture_own = memory_profile("capture", batch)
    _, portable_own = memory_profile("portable", batch)
    maps_sampled = sampled * heads * n * n * 4
    maps_all = n_layers * heads * n * n * 4
    ref_time = ref_peak = ref_note = None
    if maps_all * 1.5 < 0.7 * available_bytes():
        ref_time = measure_time(batch, ["reference"], 1)["reference"][0]
        ref_peak, _ = memory_profile("reference", batch)
    else:
        ref_note = (f"skipped: eager maps of all {n_layers} layers need "
                    f"{maps_all / 2**30:.1f} GiB, {available_bytes() / 2**30:.1f} GiB available")
    return {
        "n": n,
        "plain_cpu_s": round(times["plain"][0], 3), "plain_wall_s": round(times["plain"][1], 3),
        "capture_cpu_s": round(times["capture"][0], 3),
        "capture_wall_s": round(times["capture"][1], 3),
        "portable_cpu_s": round(times["portable"][0], 3),
        "signals_only_cpu_s": round(times["signals"][0], 3),
        "capture_over_plain": round(times["capture"][0] / times["plain"][0], 3),
        "portable_over_plain": round(times["portable"][0] / times["plain"][0], 3),
        "reference_cpu_s": None if ref_time is None else round(ref_time, 3),
        "reference_note": ref_note,
        "plain_peak_mb": _mb(plain_peak),
        "capture_peak_mb": _mb(capture_peak),
        "capture_own_peak_mb": _mb(capture_own),
        "portable_own_peak_mb": _mb(portable_own),
        "reference_peak_mb": _mb(ref_peak),
        "eager_maps_sampled_mb": _mb(maps_sampled),
        "eager_maps_all_layers_mb": _mb(maps_all),
        "capture_own_over_sampled_maps": round(capture_own / maps_sampled, 4),
        "portable_own_over_sampled_maps": round(portable_own / maps_sampled, 4),
    }


def print_table(rows):
    header = (f"{'N':>6}{'plain s':>9}{'capture s':>11}{'x plain':>9}{'portable s':>12}"
              f"{'x plain':>9}{'signals s':>11}{'ref s':>8}{'plain MB':>10}{'cap MB':>8}"
              f"{'port MB':>9}{'ref MB':>9}{'maps MB':>9}{'cap/maps':>10}")
    print("\n" + header)
    for r in rows:
        ref_s = "-" if r["reference_cpu_s"] is None else f"{r['reference_cpu_s']:.1f}"
        ref_mb = "-" if r["reference_peak_mb"] is None else r["reference_peak_mb"]
        print(f"{r['n']:>6}{r['plain_cpu_s']:>9.2f}{r['capture_cpu_s']:>11.2f}"
              f"{r['capture_over_plain']:>9.3f}{r['portable_cpu_s']:>12.2f}"
              f"{r['portable_over_plain']:>9.3f}{r['signals_only_cpu_s']:>11.2f}{ref_s:>8}"
              f"{r['plain_peak_mb']:>10}{r['capture_own_peak_mb']:>8}"
              f"{r['portable_own_peak_mb']:>9}{ref_mb!s:>9}{r['eager_maps_sampled_mb']:>9}"
              f"{100 * r['capture_own_over_sampled_maps']:>9.2f}%")
        if r["reference_note"]:
            print(f"       reference at N={r['n']}: {r['reference_note']}")
    print("cap MB / port MB: peak memory allocated by the capture itself (fused-kernel / "
          "portable path); maps MB: eager maps of the sampled layers")
    last = rows[-1]
    print(f"targets at N={last['n']}: capture forward <= 1.10x plain -> "
          f"{last['capture_over_plain']}x; capture memory <= 5% of the sampled layers' eager "
          f"maps -> {100 * last['capture_own_over_sampled_maps']:.2f}%")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "signals.json"))
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.reps = [256, 512], 1

    import torch

    from attnrl.models import load_model, load_tokenizer
    from attnrl.signals import SignalConfig

    torch.set_num_threads(1)
    model = load_model(args.model)
    input_ids = gsm8k_tokens(load_tokenizer(args.model), max(args.lengths))
    config = SignalConfig()
    for mode in MODES:                                                   # warm-up
        run_mode(mode, model, *first(input_ids, 64), config)
    rows = []
    for n in args.lengths:
        rows.append(measure(n, model, input_ids, config, args.reps))
        print(f"N={n}: capture / plain {rows[-1]['capture_over_plain']}x, capture memory "
              f"{rows[-1]['capture_own_peak_mb']} MB", flush=True)
    print_table(rows)
    result = {"model": args.model, "dtype": "float32", "threads": 1, "batch": 1,
              "reps": args.reps, "config": "SignalConfig() defaults",
              "sampled_layers": config.resolve_layers(model.config.num_hidden_layers),
              "machine": platform.processor() or platform.machine(),
              "time_method": "best-of-reps process CPU time (wall time also given)",
              "memory_method": "torch.profiler(profile_memory=True) memory timeline: peak live "
                               "bytes of the call; capture own = peak live bytes of tensors "
                               "created inside the capture's profiler regions",
              "rows": rows}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
