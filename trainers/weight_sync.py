"""The policy's full weights for the rollout engine, in bounded buckets.

Under ZeRO-3 every rank holds 1/N of each parameter; the engine needs whole tensors.
Gathering every parameter at once (and cloning it) put about two full copies of the model
beside the shards. Here the tensors are split into buckets in state-dict order (one bucket
at most `bucket_bytes`, default the largest tensor's size, so a bucket is one large tensor
or several small ones); each bucket is gathered (`deepspeed.zero.GatheredParameters`, a
collective: every rank walks the same buckets in the same order), handed to the engine,
and released before the next one is gathered. Peak extra memory of a sync: one bucket (plus
what the engine copies of it), not the model.

On CPU a released bucket (gathered, or LoRA-merged) goes back to the C allocator, and
glibc keeps much of it in its heap: a sync's extra RSS was about 6x the largest bucket
(benchmarks/zero3_sync.py). So when the policy's parameters are on CPU, each released
bucket is handed back to the system (`malloc_trim(0)`, where libc has it; a no-op
elsewhere): about 2.5-3x, the same for a model 2.8x larger. GPU memory is left to
PyTorch's caching allocator, which reuses a freed bucket's blocks for the next one.

LoRA (PEFT) models: a LoRA layer's base weight and adapters are gathered in one bucket and
merged there (`merged_lora_state_dict(model, only=...)`); the engine gets HF names.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class SyncStats:
    """What one sync moved. Bytes are full (gathered) tensor sizes."""

    model_bytes: int = 0             # every distinct tensor of the state dict
    largest_tensor_bytes: int = 0
    bucket_limit_bytes: int = 0
    buckets: int = 0
    peak_gathered_bytes: int = 0     # ZeRO-3: largest sum of gathered, non-persistent params
    bucket_bytes: list[int] = field(default_factory=list)


@dataclass
class _Unit:
    """Tensors gathered together: one parameter (all its tied names), or a LoRA layer's
    base weight with its adapters."""

    names: list[str]                 # raw state-dict names
    params: list[torch.nn.Parameter]
    nbytes: int


def full_bytes(param: torch.Tensor) -> int:
    """Bytes of the whole tensor (a ZeRO-3 parameter's full shape, not its shard)."""
    return int(getattr(param, "ds_numel", param.numel())) * param.element_size()


def hf_name(raw: str) -> str:
    """The HF name of a (PEFT-wrapped) state-dict name."""
    raw = re.sub(r"\.modules_to_save\.[^.]+", "", raw)
    return raw.replace("base_model.model.", "", 1).replace(".base_layer", "")


def gathered_bytes(model) -> int:
    """Bytes of the ZeRO-3 parameters of `model` that are gathered right now, persistent
    (never partitioned) ones excepted; 0 without ZeRO-3."""
    return sum(p.data.numel() * p.element_size() for p in model.parameters()
               if hasattr(p, "ds_id") and not getattr(p, "ds_persist", False))


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None (musl, macOS, Windows: no such function)."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):  # TypeError: CDLL(None) on Windows
        return None


def release_cpu_heap() -> bool:
    """Hand the C heap's free memory back to the system (glibc `malloc_trim(0)`); False
    where libc has no such function (nothing is done)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class WeightStream:
    """The engine-facing weights of `model`: `names` (HF names, known before anything is
    gathered) and `chunks()`, which yields {HF name: tensor} one bucket at a time. A
    chunk's tensors are valid only until the next chunk is requested. `chunks()` must be
    run to the end on every rank (ZeRO-3: each bucket is a collective)."""

    def __init__(self, model, zero3: bool, bucket_bytes: int | None = None):
        self.model, self.zero3 = model, zero3
        self.lora = hasattr(model, "peft_config")
        first = next(model.parameters(), None)
        self.cpu = first is not None and first.device.type == "cpu"  # trim the heap
        state = model.state_dict()  # ZeRO-3: placeholders, nothing is gathered
        params = self._params = dict(model.named_parameters(remove_duplicate=False))
        self._extra = {k: v for k, v in state.items() if k not in params}  # buffers
        self.units = self._units(list(state), params)
        self.stats = SyncStats()
        sizes = [u.nbytes for u in self.units]
        self.stats.model_bytes = sum(sizes) + sum(
            v.numel() * v.element_size() for v in self._extra.values())
        self.stats.largest_tensor_bytes = max(sizes, default=0)
        self.stats.bucket_limit_bytes = int(bucket_bytes or self.stats.largest_tensor_bytes)
        keep = [k for k in state if not (self.lora and _lora_only(k))]
        self.names = [hf_name(k) if self.lora else k for k in keep]

    def _units(self, names: list[str], params: dict) -> list[_Unit]:
        owner = {}  # raw name -> key of its unit
        if self.lora:
            from peft.tuners.lora import LoraLayer

            for module_name, module in self.model.named_modules():
                if isinstance(module, LoraLayer):
                    prefix = module_name + "."
                    for n in names:
                        if n.startswith(prefix):
                            owner[n] = ("lora", module_name)
        units: dict = {}
        for name in names:
            param = params.get(name)
            if param is None:
                continue
            key = owner.get(name, ("param", id(param)))
            unit = units.setdefault(key, _Unit([], [], 0))
            unit.names.append(name)
            if all(p is not param for p in unit.params):
                unit.params.append(param)
                unit.nbytes += full_bytes(param)
        return list(units.values())

    def buckets(self) -> list[list[_Unit]]:
        """Units packed in order; a bucket exceeds the limit only when one unit does."""
        out, size = [[]], 0
        for unit in self.units:
            if out[-1] and size + unit.nbytes > self.stats.bucket_limit_bytes:
                out.append([])
                size = 0
            out[-1].append(unit)
            size += unit.nbytes
        return [b for b in out if b]

    def chunks(self) -> Iterator[dict[str, torch.Tensor]]:
        stats = self.stats
        if self._extra:  # buffers are never partitioned
            yield {(hf_name(k) if self.lora else k): v.detach() for k, v in self._extra.items()
                   if not (self.lora and _lora_only(k))}
        for bucket in self.buckets():
            params = [p for unit in bucket for p in unit.params]
            gather = contextlib.nullcontext()
            if self.zero3:
                import deepspeed

                gather = deepspeed.zero.GatheredParameters(params)
            with gather, torch.no_grad():
                stats.buckets += 1
                stats.bucket_bytes.append(sum(u.nbytes for u in bucket))
                if self.zero3:
                    stats.peak_gathered_bytes = max(stats.peak_gathered_bytes,
                                                    gathered_bytes(self.model))
                raw = [n for unit in bucket for n in unit.names]
                if self.lora:
                    from trainers.lora_merge import merged_lora_state_dict

                    yield merged_lora_state_dict(self.model, only=set(raw))
                else:
                    yield {n: self._params[n].detach() for n in raw}
            if self.cpu and (self.zero3 or self.lora):  # released: give its heap back
                release_cpu_heap()


def _lora_only(raw: str) -> bool:
    """State-dict entries that are not part of the merged model."""
    return "lora_" in raw or ".original_module." in raw
