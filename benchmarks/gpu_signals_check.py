"""Equality check of the signal capture's CUDA path (needs a GPU; torch + transformers only).

    PYTHONPATH=. python benchmarks/gpu_signals_check.py --out OUT.json

1. The statistics kernel on CUDA (`kernel_lse_and_span`: torch's memory-efficient attention
   in float32, key position in the value, padded keys by a key channel) plus the band pass,
   on random bf16 and float32 q / k with plain causal, padding and sliding-window masks:
   per-head WAAD, FAI sums and span against the float64 definition on the same q / k,
   within the float32 rule of the test suite (84 float32 ulps, the span's bound times N).
   A sliding-window mask must fall back to the blockwise pass (None from the kernel).
2. A tiny bf16 Llama on CUDA in a training forward with gradient checkpointing: every
   sampled layer took the `kernel` path, its statistics equal the float64 definition on
   that layer's own bf16 q / k, and the loss and every gradient equal those without the
   capture; the no_grad logits too.
Prints one line per check, writes the JSON, exits 1 if any check fails.
"""

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import torch

DEVICE = "cuda"  # --device cpu runs the same checks on the CPU kernel
EPS32_BOUND = 84 * torch.finfo(torch.float32).eps       # tests/tolerances.py: float32 rule


def float64_stats(q, k, allowed, scaling, response, window, h_lo, h_hi):
    """WAAD, FAI sums, span (B, H, N) float64 on CPU from explicit softmax maps of q / k
    as given; allowed (B|1, 1, N, N) bool or None (causal); rows without keys zeroed."""
    q, k = q.detach().double().cpu(), k.detach().double().cpu()
    B, H, n, _ = q.shape
    group = H // k.shape[1]
    logits = q @ k.repeat_interleave(group, 1).transpose(-1, -2) * scaling
    dist = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    causal = dist >= 0
    allowed = causal if allowed is None else allowed.cpu() & causal
    maps = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    has_keys = allowed.expand(B, H, n, n).diagonal(dim1=-2, dim2=-1)
    waad = (maps * dist.clamp(0, window)).sum(-1) * has_keys
    span = (maps * dist.clamp(min=0)).sum(-1) * has_keys
    band = (dist >= h_lo) if h_hi is None else (dist >= h_lo) & (dist <= h_hi)
    fai_sum = (maps * (band[None, None] & response.cpu()[:, None, :, None])).sum(-2)
    return waad, fai_sum, span


def excess(got, expect, terms=1):
    """max over entries of |x - r| / (bound (1 + |r|)); <= 1 passes the float32 rule."""
    bound = EPS32_BOUND * math.sqrt(terms)
    got = got.detach().double().cpu()
    return float(((got - expect).abs() / (bound * (1 + expect.abs()))).max())


def check_stats(name, got, expect, response, n, results):
    rk = response.cpu()[:, None, :].expand_as(expect[0])
    worst = {"waad": excess(got[0], expect[0]),
             "fai_sum": excess(got[1][rk.to(got[1].device)], expect[1][rk]),
             "span": excess(got[2], expect[2], terms=n * n)}
    ok = max(worst.values()) <= 1.0
    results.append({"check": name, "ok": ok, "worst_over_bound": worst})
    print(f"{'ok  ' if ok else 'FAIL'} {name}: worst error / float32 bound {worst}", flush=True)


def padded_mask(B, n, pads, sliding=None):
    from attnrl.signals.reference import padded_causal_mask

    allowed, keep = padded_causal_mask(B, n, pads, sliding)
    return allowed.to(DEVICE), keep


def kernel_checks(results):
    from attnrl.signals.band import layer_statistics
    from attnrl.signals.blocks import float32_qk, padding_key_mask
    from attnrl.signals.kernels import kernel_lse_and_span, kernel_width

    gen = torch.Generator().manual_seed(0)
    B, H, h_kv, n, window, h_lo, h_hi = 2, 8, 2, 1200, 10, 10, 100
    for dtype in (torch.bfloat16, torch.float32):
        for d in (64, 128):
            q = (torch.randn(B, H, n, d, generator=gen) * 0.5).to(DEVICE, dtype)
            k = (torch.randn(B, h_kv, n, d, generator=gen) * 0.5).to(DEVICE, dtype)
            scaling = d ** -0.5
            for kind in ("causal", "padding", "sliding"):
                if kind == "causal":
                    mask, keep = None, torch.ones(B, n, dtype=torch.bool)
                else:
                    mask, keep = padded_mask(B, n, [0, 301], 64 if kind == "sliding" else None)
                response = (keep & (torch.rand(B, n, generator=gen) < 0.8)).to(DEVICE)
                key_keep = padding_key_mask(mask)
                prepared = float32_qk(q, k, scaling, kernel_width(q) - d)
                got_kernel = kernel_lse_and_span(prepared, d, mask, key_keep)
                name = f"kernel {str(dtype)[6:]} d={d} {kind} mask"
                if kind == "sliding" and DEVICE == "cuda":
                    ok = got_kernel is None
                    results.append({"check": name + " falls back", "ok": ok})
                    print(f"{'ok  ' if ok else 'FAIL'} {name}: falls back to blockwise")
                    lse = span = None
                else:
                    lse, span = got_kernel
                with torch.autocast(DEVICE, dtype=torch.bfloat16):
                    got = layer_statistics(q, k, mask, scaling, response, window, h_lo, h_hi,
                                           lse=lse, span=span, prepared=prepared)
                expect = float64_stats(q, k, mask, scaling, response, window, h_lo, h_hi)
                check_stats(name, got, expect, response, n, results)


def model_checks(results):
    from attnrl.models import build_tiny_model
    from attnrl.signals import SignalCapture, SignalConfig

    model = build_tiny_model("llama", seed=0, num_heads=8, num_kv_heads=2, num_layers=4,
                             head_dim=64, max_position_embeddings=8192)
    with torch.no_grad():  # peaked attention
        gen = torch.Generator().manual_seed(0)
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    model = model.to(DEVICE, torch.bfloat16)
    n = 700
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 512, (2, n), generator=gen).to(DEVICE)
    attention = torch.ones(2, n, dtype=torch.long, device=DEVICE)
    attention[1, :150] = 0
    response = torch.zeros(2, n, dtype=torch.bool, device=DEVICE)
    response[0, 200:] = True
    response[1, 400:] = True
    config = SignalConfig(layers=[1, 2], window=10, h_lo=10, h_hi=100)

    def run(capture):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        model.zero_grad()
        model.train()
        model.gradient_checkpointing_enable()
        # deterministic kernels (sdpa's math backend; the statistics kernel is called
        # directly and is unaffected), so that "equal" can mean bitwise
        torch.use_deterministic_algorithms(True, warn_only=True)
        with sdpa_kernel([SDPBackend.MATH]), capture or contextlib.nullcontext():
            out = model(input_ids=ids, attention_mask=attention, labels=ids, use_cache=False)
            out.loss.backward()
        torch.use_deterministic_algorithms(False)
        model.gradient_checkpointing_disable()
        model.eval()
        return out.loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    loss, grads = run(None)
    capture = SignalCapture(model, config, response_mask=response)
    seen = {}
    original = capture._record

    def record(module, query, key, value, mask, kwargs):
        seen.setdefault(module.layer_idx, (query.detach().clone(), key.detach().clone(), mask,
                                           kwargs.get("scaling")))
        return original(module, query, key, value, mask, kwargs)

    capture._record = record
    loss_c, grads_c = run(capture)
    paths = sorted(set(capture.paths.values()))
    # bitwise equal when the plain run is reproducible; otherwise within twice the spread
    # between two plain runs (some CUDA backward kernels accumulate with atomics)
    _, grads2 = run(None)
    noise = max(float((grads2[k] - grads[k]).abs().max()) for k in grads)
    diff = max(float((grads_c[k] - grads[k]).abs().max()) for k in grads)
    same = bool(torch.equal(loss_c, loss)) and diff <= 2 * noise
    results.append({"check": "model bf16 checkpointed: path, loss and gradients",
                    "ok": paths == ["kernel"] and same, "paths": paths,
                    "max_grad_diff": diff, "plain_rerun_max_grad_diff": noise})
    print(f"{'ok  ' if paths == ['kernel'] and same else 'FAIL'} model bf16 checkpointed: "
          f"paths {paths}, loss equal, max gradient difference {diff:.3g} (plain vs plain "
          f"{noise:.3g})", flush=True)
    stats = capture.head_stats()
    for i, layer in enumerate(stats.layers):
        q, k, mask, scaling = seen[layer]
        expect = float64_stats(q, k, mask, scaling, response, 10, 10, 100)
        check_stats(f"model bf16 layer {layer}", (stats.waad[:, i], stats.fai_sum[:, i],
                                                  stats.span[:, i]), expect, response, n,
                    results)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=attention).logits
        with SignalCapture(model, config, response_mask=response):
            captured = model(input_ids=ids, attention_mask=attention).logits
    real = attention.bool()
    ok = bool(torch.equal(captured[real], plain[real]))
    results.append({"check": "model bf16 no_grad logits equal", "ok": ok})
    print(f"{'ok  ' if ok else 'FAIL'} model bf16 no_grad logits with capture equal plain")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_signals_check.json")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    results = []
    for part in (kernel_checks, model_checks):
        try:
            part(results)
        except Exception as error:  # noqa: BLE001  (report and go on to the next part)
            results.append({"check": part.__name__, "ok": False, "error": repr(error)[:2000]})
            print(f"FAIL {part.__name__}: {error!r}", flush=True)
    out = {"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else DEVICE,
           "torch": torch.__version__,
           "all_ok": all(r["ok"] for r in results), "checks": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}; all ok: {out['all_ok']}")
    return 0 if out["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
