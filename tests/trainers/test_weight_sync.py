"""trainers/weight_sync.py and the engines' streamed weight update, in one process (no
ZeRO-3 here; the 2-process ZeRO-3 runs are in test_zero3_sync.py): buckets stay under
their limit and cover every tensor once, tied weights travel together, the HF engine
checks the announced names before it asks for the first chunk and refuses a stream that
gives other names than announced."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnrl.models import build_tiny_model
from attnrl.rollout.hf import HFEngine
from trainers.weight_sync import WeightStream

REPO = Path(__file__).resolve().parents[2]


def tiny(seed, tied=False):
    return build_tiny_model("llama", seed=seed, num_heads=4, num_kv_heads=2,
                            tie_word_embeddings=tied)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_stream_into_hf_engine_is_exact_and_bucketed(tiny_tokenizer, tied):
    policy, engine = tiny(1, tied), HFEngine(tiny(2, tied), tiny_tokenizer)
    stream = WeightStream(policy, zero3=False)
    assert stream.names == list(policy.state_dict())
    buckets = stream.buckets()
    limit = stream.stats.bucket_limit_bytes
    assert limit == max(p.numel() * 4 for p in policy.parameters()) and len(buckets) > 2
    assert all(sum(u.nbytes for u in b) <= limit for b in buckets)
    names = [n for b in buckets for u in b for n in u.names]
    assert sorted(names) == sorted(stream.names)  # every name once
    if tied:  # one unit holds both names of the shared tensor
        unit = next(u for b in buckets for u in b if "lm_head.weight" in u.names)
        assert unit.names == ["model.embed_tokens.weight", "lm_head.weight"]
    engine.update_weights_stream(stream.names, stream.chunks())
    assert stream.stats.buckets == len(buckets)
    held = engine.model.state_dict()
    for name, tensor in policy.state_dict().items():
        assert torch.equal(held[name], tensor), name


def test_hf_engine_checks_names_before_the_first_chunk(tiny_tokenizer):
    policy, engine = tiny(1), HFEngine(tiny(2), tiny_tokenizer)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    stream = WeightStream(policy, zero3=False)
    started = []

    def chunks():
        started.append(True)  # under ZeRO-3 this would be the first gather
        yield from stream.chunks()

    with pytest.raises(ValueError, match=r"model tensors not given: model\.norm\.weight"):
        engine.update_weights_stream([n for n in stream.names if n != "model.norm.weight"],
                                     chunks())
    assert not started
    # a stream that gives fewer tensors than it announced is an error (the run stops: the
    # engine, loaded chunk by chunk, may hold part of the new weights)
    short = ({k: v for k, v in c.items() if k != "model.norm.weight"} for c in stream.chunks())
    with pytest.raises(RuntimeError, match=r"missing \['model\.norm\.weight'\]"):
        engine.update_weights_stream(stream.names, short)
    assert torch.equal(engine.model.state_dict()["model.norm.weight"],
                       before["model.norm.weight"])


def test_bucket_limit_is_a_parameter(tiny_tokenizer):
    policy = tiny(1)
    one = WeightStream(policy, zero3=False, bucket_bytes=1)  # one tensor per bucket
    assert len(one.buckets()) == len(list(policy.parameters()))
    whole = WeightStream(policy, zero3=False, bucket_bytes=1 << 40)
    assert len(whole.buckets()) == 1


def test_cpu_heap_is_handed_back_after_each_allocated_bucket(monkeypatch):
    """On CPU a bucket that was allocated (ZeRO-3 gathered, or LoRA-merged) is handed back
    to the system once released (trainers.weight_sync.release_cpu_heap), before the next
    one is made; a plain stream without ZeRO-3 allocates nothing (live tensors) and trims
    nothing. The ZeRO-3 case runs in test_zero3_sync.py (2 processes)."""
    from peft import LoraConfig, get_peft_model

    from trainers import weight_sync

    events = []
    monkeypatch.setattr(weight_sync, "release_cpu_heap", lambda: events.append("release"))

    def walk(stream):
        for _ in stream.chunks():
            events.append("chunk")

    plain = WeightStream(tiny(1), zero3=False)
    walk(plain)
    assert plain.cpu and "release" not in events
    events.clear()
    lora = WeightStream(get_peft_model(tiny(1), LoraConfig(r=4, target_modules=["q_proj"])),
                        zero3=False)
    walk(lora)
    # a chunk of buffers (never allocated) comes first where the model has any
    assert lora.stats.buckets > 2
    assert events == ["chunk"] * bool(lora._extra) + ["chunk", "release"] * lora.stats.buckets


HEAP_PROBE = """
import torch
from trainers.weight_sync import release_cpu_heap

def rss():
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith("VmRSS")).split()[1]) / 1024

torch.ones(4 << 20)  # 16 MiB, mmapped; its free raises glibc's mmap threshold past 1 MiB
base = rss()
held = [torch.ones(1 << 18) for _ in range(64)]  # 64 x 1 MiB, now from the heap
del held[:-1]  # freed below the live last one: the heap top cannot shrink by itself
kept = rss()
print(release_cpu_heap(), base, kept, rss())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_cpu_heap_returns_freed_heap_to_the_system():
    """What the hand-back is for, in a fresh process: glibc keeps 63 freed 1 MiB tensors
    in its heap (RSS stays up); release_cpu_heap() gives them back."""
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True,
                         check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    released, base, kept, after = out.stdout.split()
    base, kept, after = float(base), float(kept), float(after)
    assert released == "True"
    if kept - base < 48:
        pytest.skip(f"this glibc returned the freed heap by itself ({kept - base:.0f} MiB kept)")
    assert after - base < 8, (base, kept, after)
