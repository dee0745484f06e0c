"""Reasoning vectors: streaming task arithmetic over safetensors checkpoints
(docs/methods.md section 4).

    theta_out = theta_target + alpha * (theta_rl - theta_sft)

Tensors are read and written in row blocks (`chunk_elements` elements at a time) with plain
file reads, so peak memory is a few blocks, never a whole tensor or model. Arithmetic is in
float32; each output tensor keeps the target's dtype and shape. Output: sharded safetensors
plus `model.safetensors.index.json`, the target's non-weight files (config, tokenizer, ...)
and `merge_summary.json`, all written to a temporary sibling of OUT and renamed at the end.

Per target tensor name: combined when RL and SFT provide it with the target's shape; copied
unchanged (and listed) when its shape differs, when RL or SFT lacks it, when it matches an
`exclude` regex or is not floating point. Names only in RL / SFT are ignored (and listed).
Quantized checkpoints are refused (a UserError naming the tensor and its dtype): float8
tensors, integer weights, and weights with a quantization scale beside them
(`weight_scale`, `weight_scale_inv`, `scales`, ...), unless excluded: their stored values
are not the weights, so the arithmetic would be in the wrong units.

PEFT LoRA adapters (a directory with adapter_config.json + adapter_model.safetensors) may
stand for RL or SFT. An adapter means "the weights it was trained on, plus its delta"
(delta = B @ A * lora_alpha / r, or / sqrt(r) with use_rslora):
- adapter vs full checkpoint: the adapter was trained on the other side, so its weight is
  the other side's weight + delta, and the vector is +delta (RL adapter) or -delta (SFT
  adapter); tensors the adapter does not touch have a zero vector (target copied).
- adapter vs adapter: both were trained on one shared base, so v = delta_rl - delta_sft.
- full tensors saved inside an adapter (modules_to_save, base_layer copies, biases) replace
  the implied base weight for that tensor; when only one of two adapters saves such a full
  tensor the shared base would be needed, so that tensor is copied and listed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from attnrl.atomic import fsync_dir
from attnrl.errors import UserError
from attnrl.merge.io import INDEX_NAME, PICKLE_SUFFIXES, Checkpoint, ShardWriter
from attnrl.merge.lora import read_factor
from attnrl.merge.plan import (
    SUMMARY_NAME,
    MergeSummary,
    check_architectures,
    check_common_names,
    check_not_quantized,
    describe,
    merged_block,
    open_source,
    plan_tensors,
    shard_layout,
)

__all__ = ["MergeSummary", "add_arguments", "merge_checkpoints", "parse_size", "run"]

DEFAULT_MAX_SHARD = "2GB"
DEFAULT_CHUNK_ELEMENTS = 1 << 18  # 1 MiB of float32 per block buffer


def parse_size(text) -> int:
    """'2GB' -> 2e9 bytes ('MB', 'KB' decimal; 'GiB', 'MiB', 'KiB' binary; plain bytes)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match[2].upper() not in units or float(match[1]) <= 0:
        raise UserError(f"shard size {text!r} is not a positive size; write e.g. 2GB, "
                        "500MB, 1GiB or a byte count")
    return int(float(match[1]) * units[match[2].upper()])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _work_prefix(out: Path, kind: str) -> str:
    """Hidden sibling names of OUT for in-progress work: .OUT.merge-tmp-HOST-PID-XXXX."""
    return f".{out.name}.merge-{kind}-{socket.gethostname()}-"


def _clean_stale(out: Path) -> None:
    """Remove temp dirs left by killed merges into OUT (same host, owner process gone); an
    old OUT moved aside by a --force run that died mid-swap is put back when OUT is absent."""
    for kind in ("tmp", "old"):
        prefix = _work_prefix(out, kind)
        for path in sorted(out.parent.glob(prefix + "*")):
            pid = path.name[len(prefix):].split("-", 1)[0]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            if kind == "old" and not out.exists():
                os.replace(path, out)
            else:
                shutil.rmtree(path, ignore_errors=True)


def _copy_aux_files(target: Checkpoint, into: Path) -> list[str]:
    """Copy the target directory's top-level non-weight files (config, tokenizer, ...)."""
    if target.path.is_file():
        return []
    copied = []
    for path in sorted(target.path.iterdir()):
        name = path.name
        if (not path.is_file() or name.startswith(".") or name == SUMMARY_NAME
                or name.endswith((".safetensors", ".safetensors.index.json"))
                or path.suffix in PICKLE_SUFFIXES):
            continue
        shutil.copy2(path, into / name)
        copied.append(name)
    return copied



def merge_checkpoints(rl, sft, target, out, alpha: float = 1.0, exclude=None,
                      force: bool = False, max_shard_bytes: int | str = DEFAULT_MAX_SHARD,
                      chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, progress: bool = True,
                      on_tensor: Callable[[str, int], None] | None = None,
                      allow_partial: bool = False) -> MergeSummary:
    """Write target + alpha * (rl - sft) to `out` (a new directory); see the module doc.

    rl, sft: model dirs, safetensors files / indexes, or PEFT LoRA adapter dirs. target: a
    full checkpoint. exclude: regex or list of regexes (re.search on tensor names) whose
    tensors are copied from the target. max_shard_bytes: output shard limit (int or '2GB').
    chunk_elements: elements per block (memory use). on_tensor(name, i): called after each
    output tensor is written. allow_partial: merge even when a tensor that RL, SFT and target
    all hold differs in shape (it is copied from the target); without it that is an error,
    since the vector would reach only part of the target.
    """
    started = time.perf_counter()
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise UserError(f"alpha must be a finite number, got {alpha}")
    max_shard_bytes = parse_size(max_shard_bytes)
    patterns = [exclude] if isinstance(exclude, str) else list(exclude or [])
    try:
        excludes = [re.compile(p) for p in patterns]
    except re.error as err:
        raise UserError(f"--exclude pattern is not a valid regular expression ({err}); "
                        r"write e.g. 'embed_tokens|norm'") from None
    sources = {role: open_source(p, role) for role, p in
               (("RL", rl), ("SFT", sft), ("target", target))}
    rl_src, sft_src, target_src = sources["RL"], sources["SFT"], sources["target"]
    if target_src.is_adapter:
        raise UserError(f"target {target_src.path} is a LoRA adapter; the target must be full "
                        "weights: merge the adapter into its base with merge_and_unload() and "
                        "save_pretrained it, then pass that directory")
    out = Path(out).expanduser().absolute()
    for role, source in sources.items():
        src = source.path.absolute()
        if src == out or out in src.parents:
            raise UserError(f"--out {out} would overwrite the {role} checkpoint {src}; "
                            "choose a new output directory")
    if out.parent.is_dir():
        _clean_stale(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory; remove it or choose "
                        "another --out")
    if _nonempty_dir(out) and not force:
        raise UserError(f"output {out} already exists; pass --force to replace it (it is "
                        "replaced only after the new merge is complete) or choose another --out")
    check_architectures(rl_src, sft_src, target_src)
    check_common_names(rl_src, sft_src, target_src)
    check_not_quantized(sources, excludes)
    summary = MergeSummary(str(rl_src.path), str(sft_src.path), str(target_src.path), str(out),
                           alpha, *("lora_adapter" if s.is_adapter else "checkpoint"
                                    for s in (rl_src, sft_src)))
    plans = plan_tensors(rl_src, sft_src, target_src, excludes, summary)
    if not summary.combined and summary.shape_mismatch:
        raise UserError(f"no tensor has the same shape in RL, SFT and target (e.g. "
                        f"{describe(summary.shape_mismatch[0])}); pass checkpoints of the "
                        "same model size")
    if summary.shape_mismatch and not allow_partial:
        first = describe(summary.shape_mismatch[0])
        total = len(summary.shape_mismatch) + len(summary.combined)
        raise UserError(f"{len(summary.shape_mismatch)} of {total} tensors held by RL, SFT and "
                        f"target differ in shape (e.g. {first}): the vector would reach only "
                        "part of the target; pass checkpoints of the same model, or "
                        "--allow-partial to merge the matching tensors and copy the others "
                        "from the target")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=_work_prefix(out, "tmp") + f"{os.getpid()}-",
                                 dir=out.parent))
    try:
        _write_all(plans, rl_src, sft_src, target_src, work, alpha, max_shard_bytes,
                   max(1, int(chunk_elements)), progress, on_tensor, summary)
        summary.copied_files = _copy_aux_files(target_src, work)
        summary.seconds = time.perf_counter() - started
        (work / SUMMARY_NAME).write_text(json.dumps(summary.to_json(), indent=2))
        fsync_dir(work)
        _install(work, out, force)
    except OSError as err:
        raise UserError(f"writing the merge next to {out} failed ({err}); free disk space or "
                        "choose a writable --out") from err
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return summary


def _write_all(plans, rl, sft, target, work: Path, alpha: float, max_shard_bytes: int,
               chunk_elements: int, progress: bool, on_tensor, summary: MergeSummary) -> None:
    from tqdm import tqdm

    shards = shard_layout(plans, max_shard_bytes)
    files = {f for src in (rl, sft, target) for f in src.files}
    fds = {f: os.open(f, os.O_RDONLY) for f in files}
    weight_map, count = {}, 0
    try:
        with tqdm(total=len(plans), unit="tensor", desc="merge", disable=not progress,
                  file=sys.stderr) as bar:
            for number, shard in enumerate(shards, 1):
                shard_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
                writer = ShardWriter(work / shard_name, [
                    (p.target.name, p.target.dtype, p.target.shape) for p in shard])
                for plan in shard:
                    entry = plan.target
                    step = max(1, chunk_elements // max(1, entry.numel // max(1, entry.rows)))
                    for start in range(0, entry.rows, step):
                        stop = min(entry.rows, start + step)
                        writer.write(merged_block(plan, start, stop, alpha, fds))
                    weight_map[entry.name] = shard_name
                    bar.update(1)
                    if on_tensor is not None:
                        on_tensor(entry.name, count)
                    count += 1
                writer.close()
                summary.total_bytes += writer.data_bytes
    finally:
        read_factor.cache_clear()
        for fd in fds.values():
            os.close(fd)
    summary.shards = len(shards)
    index = {"metadata": {"total_size": summary.total_bytes},
             "weight_map": dict(sorted(weight_map.items()))}
    (work / INDEX_NAME).write_text(json.dumps(index, indent=2))


def _nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _install(work: Path, out: Path, force: bool) -> None:
    """Rename the finished `work` dir to `out`; with `force` an existing `out` is moved
    aside first and deleted only after the new one is in place."""
    if force and _nonempty_dir(out):
        old = Path(tempfile.mkdtemp(prefix=_work_prefix(out, "old") + f"{os.getpid()}-",
                                    dir=out.parent))
        os.replace(out, old)
        os.replace(work, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.replace(work, out)
    except OSError as err:
        raise UserError(f"could not move the finished merge into {out} ({err}); another "
                        "process may have created it meanwhile: pass --force or another --out")


# ------------------------------------------------------------------------ CLI

def add_arguments(parser) -> None:
    parser.add_argument("--rl", required=True, help="RL checkpoint dir / file or LoRA adapter (or smollm2)")
    parser.add_argument("--sft", required=True, help="SFT checkpoint dir / file or LoRA adapter (or smollm2)")
    parser.add_argument("--target", required=True, help="full checkpoint to add the vector to (or smollm2)")
    parser.add_argument("--out", required=True, help="new output directory")
    parser.add_argument("--alpha", type=float, default=1.0,
                        help="vector scale (default 1; negative removes the capability)")
    parser.add_argument("--exclude", action="append", metavar="REGEX", default=[],
                        help="copy tensors whose name matches from the target (repeatable)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing OUT once the new merge is complete")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD,
                        help="output shard size limit, e.g. 2GB, 500MB (default 2GB)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--allow-partial", action="store_true",
                        help="merge even when some tensors differ in shape between RL, SFT and "
                        "target (those are copied from the target and listed)")


def run(args) -> int:
    summary = merge_checkpoints(args.rl, args.sft, args.target, args.out, alpha=args.alpha,
                                exclude=args.exclude, force=args.force,
                                max_shard_bytes=args.max_shard_size, progress=not args.quiet,
                                allow_partial=args.allow_partial)
    print(summary.render())
    return 0
