"""Which output tensors are combined and how (sources, checks, per-tensor plans, summary)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from attnrl.errors import UserError
from attnrl.merge.io import Checkpoint, TensorEntry, load_checkpoint, read_block
from attnrl.merge.lora import LoraAdapter, LoraDelta

SUMMARY_NAME = "merge_summary.json"


def open_source(path, role: str) -> Checkpoint | LoraAdapter:
    """A full checkpoint or a LoRA adapter (dir with adapter_config.json), headers checked;
    'smollm2' names the packaged SmolLM2-135M-Instruct."""
    from attnrl.models import SMOLLM2_NAMES, resolve_model

    if str(path) in SMOLLM2_NAMES or str(path).lower() in SMOLLM2_NAMES:
        path = resolve_model(path)  # the packaged SmolLM2-135M-Instruct, converted once
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{role} checkpoint {str(path)!r} does not exist; give a model "
                        "directory, a .safetensors file or a PEFT adapter directory")
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return LoraAdapter.load(path, role)
    return load_checkpoint(path)


BASE = "shared base"  # the weights two adapters were trained on (never available here)


@dataclass
class TensorPlan:
    """How one output tensor is made: `fulls` (+, -) pair and signed LoRA deltas, or a copy
    of the target (terms empty)."""
    target: TensorEntry
    fulls: tuple[TensorEntry, TensorEntry] | None = None
    deltas: list[tuple[float, LoraDelta]] = field(default_factory=list)

    @property
    def combine(self) -> bool:
        return self.fulls is not None or bool(self.deltas)


def _side(source, name: str):
    """(full weight entry or None, delta or None) of one side for a base tensor name."""
    if source.is_adapter:
        return source.fulls.get(name), source.deltas.get(name)
    return source.entries.get(name), None


def check_architectures(rl, sft, target: Checkpoint) -> None:
    def family(config):
        return (config or {}).get("model_type"), tuple((config or {}).get("architectures") or ())

    want = family(target.config)
    for role, source in (("RL", rl), ("SFT", sft)):
        if source.is_adapter:
            base_class = (source.config.get("auto_mapping") or {}).get("base_model_class")
            if base_class and want[1] and base_class not in want[1]:
                raise UserError(f"{role} adapter {source.path} was trained on a {base_class}, "
                                f"but the target is {want[1][0]}; merge checkpoints of the "
                                "same architecture")
        elif source.config and target.config and family(source.config) != want:
            raise UserError(f"architecture mismatch: {role} {source.path} is {family(source.config)}"
                            f" but target {target.path} is {want} (model_type, architectures "
                            "in config.json); RL, SFT and target must be the same model family")


@dataclass
class MergeSummary:
    """What happened to every tensor; saved as merge_summary.json in OUT."""
    rl: str
    sft: str
    target: str
    out: str
    alpha: float
    rl_kind: str
    sft_kind: str
    combined: list[str] = field(default_factory=list)
    shape_mismatch: list[dict] = field(default_factory=list)
    missing: list[dict] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    zero_vector: list[str] = field(default_factory=list)
    needs_base: list[str] = field(default_factory=list)
    not_float: list[str] = field(default_factory=list)
    not_in_target: list[dict] = field(default_factory=list)
    copied_files: list[str] = field(default_factory=list)
    shards: int = 0
    total_bytes: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    def render(self, show: int = 5) -> str:
        rows = [("combined", self.combined, ""),
                ("shape mismatch", self.shape_mismatch, "target copied"),
                ("missing in RL/SFT", self.missing, "target copied"),
                ("excluded", self.excluded, "target copied"),
                ("zero vector", self.zero_vector, "no adapter delta; target copied"),
                ("needs base weight", self.needs_base, "target copied"),
                ("not floating point", self.not_float, "target copied"),
                ("not in target", self.not_in_target, "ignored")]
        lines = [(f"merged {self.target} + {self.alpha:g} * ({self.rl} - {self.sft}) -> "
                  f"{self.out}: {self.shards} shard(s), {self.total_bytes / 1e6:.1f} MB, "
                  f"{self.seconds:.1f} s")]
        for label, items, note in rows:
            if not items and label != "combined":
                continue
            names = [i if isinstance(i, str) else describe(i) for i in items[:show]]
            more = f", ... ({len(items) - show} more)" if len(items) > show else ""
            detail = f": {', '.join(names)}{more}" if names and label != "combined" else ""
            lines.append(f"  {label:<19}{len(items):>6}{f'  [{note}]' if note else ''}{detail}")
        lines.append(f"  summary: {Path(self.out) / SUMMARY_NAME}")
        return "\n".join(lines)


def describe(item: dict) -> str:
    extra = {k: v for k, v in item.items() if k != "name"}
    return f"{item['name']} {extra}"


def plan_tensors(rl, sft, target: Checkpoint, excludes: list[re.Pattern], summary: MergeSummary):
    """One TensorPlan per target tensor, in target file order; fills the summary lists."""
    plans = []
    order = sorted(target.entries.values(),
                   key=lambda e: (target.files.index(e.file), e.offset))
    for entry in order:
        name, plan = entry.name, TensorPlan(entry)
        plans.append(plan)
        (rl_full, rl_delta), (sft_full, sft_delta) = _side(rl, name), _side(sft, name)
        lacking = [role for role, src, full in (("rl", rl, rl_full), ("sft", sft, sft_full))
                   if not src.is_adapter and full is None]
        if any(p.search(name) for p in excludes):
            summary.excluded.append(name)
            continue
        if not entry.dtype.is_floating_point:
            summary.not_float.append(name)
            continue
        if lacking:
            summary.missing.append({"name": name, "missing_from": lacking})
            continue
        # An adapter with no full tensor stands on the other side's weight (or a shared base).
        if rl.is_adapter and rl_full is None:
            rl_full = sft_full if not sft.is_adapter else BASE
        if sft.is_adapter and sft_full is None:
            sft_full = rl_full if not rl.is_adapter else BASE
        terms = {role: [t for t in pair if t is not None and t is not BASE] for role, pair in
                 (("rl", (rl_full, rl_delta)), ("sft", (sft_full, sft_delta)))}
        if any(t.shape != entry.shape for ts in terms.values() for t in ts):
            summary.shape_mismatch.append(
                {"name": name, "target": list(entry.shape),
                 **{role: [list(t.shape) for t in ts] for role, ts in terms.items()}})
            continue
        if rl_full is not sft_full:
            if BASE in (rl_full, sft_full):
                summary.needs_base.append(name)
                continue
            plan.fulls = (rl_full, sft_full)
        plan.deltas = [(1.0, rl_delta)] * (rl_delta is not None) + \
                      [(-1.0, sft_delta)] * (sft_delta is not None)
        (summary.combined if plan.combine else summary.zero_vector).append(name)
    for role, source in (("rl", rl), ("sft", sft)):
        summary.not_in_target += [{"name": n, "source": role}
                                  for n in sorted(source.names - set(target.entries))]
    return plans


FLOAT8_DTYPES = frozenset(getattr(torch, name) for name in (
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")
    if hasattr(torch, name))
_SCALE = re.compile(r"(^|[._])(weight_scale(_inv|_2)?|weight_global_scale|scales|qzeros|"
                    r"g_idx|absmax|quant_map|quant_state\..*)$")
"""Names of quantization side tensors: a tensor prefix.X beside them is stored quantized."""


def _entries(source):
    """{name: TensorEntry} of every tensor a source stores (adapters: full tensors and
    LoRA factors)."""
    if not source.is_adapter:
        return source.entries
    found = dict(source.fulls)
    for delta in source.deltas.values():
        for entry in (delta.a, delta.b):
            if entry is not None:
                found[entry.name] = entry
    return found


def check_not_quantized(sources: dict, excludes: list[re.Pattern]) -> None:
    """UserError naming the first tensor stored quantized (float8, integer weights, or with
    a quantization scale beside it): its raw units are not weights, so arithmetic on them
    would be wrong. Tensors matched by `excludes` are copied, never combined: skipped."""
    for role, source in sources.items():
        entries = {n: e for n, e in _entries(source).items()
                   if not any(p.search(n) for p in excludes)}
        for name, entry in sorted(entries.items()):
            leaf = name.rsplit(".", 1)[-1]
            why = None
            if entry.dtype in FLOAT8_DTYPES:
                why = f"is stored as {_dtype_name(entry.dtype)}"
            elif not entry.dtype.is_floating_point and entry.dtype != torch.bool \
                    and "weight" in leaf:
                why = f"is an integer weight ({_dtype_name(entry.dtype)})"
            elif _SCALE.search(name):
                stem = name[:len(name) - len(_SCALE.search(name)[0])]
                weight = next((stem + s for s in (".weight", ".qweight", "")
                               if stem + s in entries), None)
                if weight is not None:
                    name, entry = weight, entries[weight]
                    why = (f"({_dtype_name(entry.dtype)}) has the quantization tensor "
                           f"{leaf!r} beside it")
            if why:
                raise UserError(
                    f"{role} tensor {name!r} in {source.path} {why}: arithmetic on quantized "
                    "values is not done here; merge full-precision (bf16/fp16/fp32) "
                    "checkpoints, or --exclude the tensor to copy it from the target")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_common_names(rl, sft, target: Checkpoint) -> None:
    """Mismatched checkpoints (nothing in common with the target) are an error."""
    def example(names):
        return repr(min(names)) if names else "no tensors"

    common = set(target.names)
    for role, source in (("RL", rl), ("SFT", sft)):
        if source.is_adapter and not source.names & target.names:
            raise UserError(f"{role} adapter {source.path} touches no tensor of the target "
                            f"(adapter maps to e.g. {example(source.names)}, target has e.g. "
                            f"{example(target.names)}); pass the adapter trained on this model")
        if not source.is_adapter:
            common &= source.names
    if not common:
        raise UserError(f"RL, SFT and target have no tensor names in common (RL has e.g. "
                        f"{example(rl.names)}, SFT {example(sft.names)}, target "
                        f"{example(target.names)}); pass checkpoints of the same model")


def merged_block(plan: TensorPlan, start: int, stop: int, alpha: float, fds) -> torch.Tensor:
    """target + alpha * v on rows [start, stop), flattened, in the target's dtype."""
    target = read_block(plan.target, start, stop, fds[plan.target.file])
    if not plan.combine:
        return target
    vector = None
    if plan.fulls is not None:
        plus, minus = plan.fulls
        vector = (read_block(plus, start, stop, fds[plus.file]).float()
                  - read_block(minus, start, stop, fds[minus.file]).float())
    for sign, delta in plan.deltas:
        block = delta.block(start, stop, fds)
        vector = (block if sign > 0 else -block) if vector is None else (
            vector + block if sign > 0 else vector - block)
    return (target.float() + alpha * vector).to(plan.target.dtype)


def shard_layout(plans: list[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    shards, size = [[]], 0
    for plan in plans:
        if shards[-1] and size + plan.target.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(plan)
        size += plan.target.nbytes
    return shards
