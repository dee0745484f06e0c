"""PEFT LoRA adapters as weight deltas: delta = B @ A * lora_alpha / r (or / sqrt(r) with
use_rslora), keyed by the base tensor name (base_model.model.<m>.lora_A.weight -> <m>.weight).
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from attnrl.errors import UserError
from attnrl.merge.io import PICKLE_SUFFIXES, TensorEntry, read_block, read_header


@dataclass(frozen=True)
class LoraDelta:
    """delta = B @ A * scale for one base tensor: 'linear' [out, in] (transposed when
    fan_in_fan_out), 'embedding' [num_embeddings, dim] = (B @ A).T, or 'bias' B * scale."""
    name: str
    kind: str
    a: TensorEntry | None
    b: TensorEntry
    scale: float
    transpose: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        if self.kind == "bias":
            return self.b.shape
        out, inp = self.b.shape[0], self.a.shape[1]
        return (inp, out) if self.transpose else (out, inp)

    def block(self, row_start: int, row_stop: int, fds: dict[Path, int]) -> torch.Tensor:
        """Rows [row_start, row_stop) of the delta, flattened, float32."""
        b = read_factor(self.b, fds[self.b.file])
        if self.kind == "bias":
            return b[row_start:row_stop] * self.scale
        a = read_factor(self.a, fds[self.a.file])
        if self.transpose:  # delta[i, :] = (B @ A)[:, i]
            rows = (b @ a[:, row_start:row_stop]).T
        else:
            rows = b[row_start:row_stop] @ a
        return (rows * self.scale).reshape(-1)


@functools.lru_cache(maxsize=4)
def read_factor(entry: TensorEntry, fd: int) -> torch.Tensor:
    """A whole (small, rank-r) LoRA factor as float32, kept while its tensor's blocks are
    computed; call read_factor.cache_clear() when the files are closed."""
    return read_block(entry, 0, entry.rows, fd).float().view(entry.shape)


_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?:(?P<part>[AB])(?:\.[^.]+)?\.(?P<param>weight|bias)"
                       r"|embedding_(?P<emb>[AB])(?:\.[^.]+)?)$")


class LoraAdapter:
    """A PEFT LoRA adapter directory: deltas and full tensors keyed by base tensor name."""
    is_adapter = True

    def __init__(self, path: Path, config: dict, deltas: dict, fulls: dict, files: list):
        self.path, self.config, self.deltas, self.fulls, self.files = (
            path, config, deltas, fulls, files)

    @classmethod
    def load(cls, path: Path, role: str) -> LoraAdapter:
        try:
            config = json.loads((path / "adapter_config.json").read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path / 'adapter_config.json'} is not valid JSON ({err}); save "
                            "the adapter again with save_pretrained") from None
        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            raise UserError(f"{role} adapter {path} has no adapter_model.safetensors"
                            + (f" (only {pickles[0]}, a pickle, never loaded here); "
                               "save the adapter again with save_pretrained(dir, "
                               "safe_serialization=True)" if pickles else
                               "; save it with PeftModel.save_pretrained"))
        if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
            kind = "DoRA" if config.get("use_dora") else config.get("peft_type")
            raise UserError(f"{role} adapter {path} is {kind}, not plain LoRA; merge it into "
                            "its base with peft's merge_and_unload(), save_pretrained the "
                            "result and pass that directory")
        entries = read_header(weights)
        parts: dict[tuple[str, str], TensorEntry] = {}
        fulls: dict[str, TensorEntry] = {}
        for key, entry in entries.items():
            name = re.sub(r"\.modules_to_save\.[^.]+\.", ".",
                          key.removeprefix("base_model.model."))
            match = _LORA_KEY.match(name)
            if match and match["param"] == "bias":
                parts[(match["module"] + ".bias", "bias")] = entry
            elif match:
                parts[(match["module"] + ".weight", match["part"] or match["emb"])] = entry
                if match["emb"]:
                    parts[(match["module"] + ".weight", "emb")] = entry
            elif "lora_" in name or "token_adapter" in name:
                raise UserError(f"{role} adapter {path}: tensor {key!r} is not supported "
                                "(only LoRA A/B, embedding and bias deltas are); merge it with "
                                "peft's merge_and_unload() and pass the merged directory")
            else:
                fulls[name.replace(".base_layer.", ".")] = entry
        deltas = {}
        for (name, part), entry in parts.items():
            module = name.rsplit(".", 1)[0]
            if part == "bias":
                a = parts.get((module + ".weight", "A"))
                scale = _lora_scale(config, module, a.rows if a else config.get("r", 8))
                deltas[name] = LoraDelta(name, "bias", None, entry, scale)
            elif part in ("A", "B"):
                a, b = parts.get((name, "A")), parts.get((name, "B"))
                if part == "B" and a is not None:
                    continue  # handled with its A
                if a is None or b is None or len(a.shape) != 2 or len(b.shape) != 2:
                    raise UserError(f"{role} adapter {path}: {name!r} needs 2-D lora A and B "
                                    "tensors; merge it with peft's merge_and_unload() first")
                emb = (name, "emb") in parts
                deltas[name] = LoraDelta(
                    name, "embedding" if emb else "linear", a, b,
                    _lora_scale(config, module, a.rows),
                    transpose=emb or bool(config.get("fan_in_fan_out")))
        return cls(path, config, deltas, fulls, [weights])

    @property
    def names(self) -> set[str]:
        return set(self.deltas) | set(self.fulls)


def _lora_scale(config: dict, module: str, rank: int) -> float:
    """lora_alpha / r (or / sqrt(r) with use_rslora); alpha_pattern keys match name ends."""
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
