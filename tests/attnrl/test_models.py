"""Model loading: packaged SmolLM2 (real GGUF -> safetensors cache), local dirs, tiny factory."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from attnrl.errors import UserError
from attnrl.models import (build_tiny_model, build_tiny_tokenizer, load_model, load_tokenizer,
                           resolve_model, save_tiny_model)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_tiny_models_build_and_run(arch, kv_heads):
    model = build_tiny_model(arch, num_heads=4, num_kv_heads=kv_heads)
    assert type(model).__name__.lower().startswith(arch)
    assert model.config.num_key_value_heads == kv_heads
    logits = model(input_ids=torch.tensor([[1, 5, 9, 12]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size) and torch.isfinite(logits).all()


def test_tiny_tokenizer_roundtrip_and_chat_template():
    tok = build_tiny_tokenizer()
    text = "Alice has 12 apples. #### 12"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None


def test_saved_tiny_model_loads_back(tmp_path):
    path = save_tiny_model(tmp_path / "m", arch="qwen2", num_heads=4, num_kv_heads=2)
    assert resolve_model(path) == path
    model = load_model(path)
    ref = build_tiny_model("qwen2", num_heads=4, num_kv_heads=2)
    ids = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert load_tokenizer(path).padding_side == "left"


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="not found.*local Hugging Face model directory"):
        resolve_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(tmp_path / "empty")


def test_smollm2_loads_offline_and_answers():
    path = resolve_model("smollm2")
    assert (path / "model.safetensors").is_file()
    start = time.perf_counter()
    model, tok = load_model("smollm2"), load_tokenizer("smollm2")
    assert time.perf_counter() - start < 30  # from the cache: seconds, not a conversion
    assert model.config.num_hidden_layers == 30
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


CONVERT = "from attnrl.models import resolve_model; print(resolve_model('smollm2'))"


@pytest.mark.slow
def test_conversion_is_atomic_and_concurrent_safe(tmp_path):
    """A conversion killed midway leaves no cache; two concurrent first loads both succeed."""
    env = dict(os.environ, ATTNRL_CACHE=str(tmp_path / "cache"))
    final = tmp_path / "cache" / "SmolLM2-135M-Instruct"
    victim = subprocess.Popen([sys.executable, "-c", CONVERT], env=env)
    time.sleep(6)  # inside the conversion (it takes ~20 s)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (final / "config.json").exists()

    procs = [subprocess.Popen([sys.executable, "-c", CONVERT], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0].strip().splitlines()[-1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs == [str(final)] * 2
    leftovers = [p.name for p in final.parent.iterdir() if ".tmp-" in p.name]
    assert (final / "model.safetensors").is_file()
    # the killed run's temporary directory is the only possible leftover, never a half cache
    assert len(leftovers) <= 1
