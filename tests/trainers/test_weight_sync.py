"""trainers/weight_sync.py and the engines' streamed weight update, in one process (no
ZeRO-3 here; the 2-process ZeRO-3 runs are in test_zero3_sync.py): buckets stay under
their limit and cover every tensor once, tied weights travel together, the HF engine
checks the announced names before it asks for the first chunk and refuses a stream that
gives other names than announced."""

import pytest
import torch

from attnrl.models import build_tiny_model
from attnrl.rollout.hf import HFEngine
from trainers.weight_sync import WeightStream


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
