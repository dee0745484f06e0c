"""safetensors reading and writing without pickle and without whole-file memory maps.

`read_header` validates a file's header (offsets, sizes) so truncation is caught before any
data is read; `read_block` reads rows of one tensor with `os.preadv`; `ShardWriter` writes a
file whose header is planned up front, then its tensor bytes block by block.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from attnrl.errors import UserError

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}
CONVERT_HINT = ("convert it to safetensors first: load it with transformers and call "
                "save_pretrained(dir, safe_serialization=True)")

@dataclass(frozen=True)
class TensorEntry:
    """One tensor inside a safetensors file: bytes [offset, offset + nbytes) of `file`."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def rows(self) -> int:
        """Size of dim 0 (1 for a scalar); blocks of rows are contiguous bytes."""
        return self.shape[0] if self.shape else 1


def corrupt_error(path: Path, problem: str) -> UserError:
    return UserError(f"{path} is truncated or corrupt ({problem}); re-save or re-download "
                     "this file, or point to a complete checkpoint")


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate a safetensors header without reading tensor data."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise corrupt_error(path, f"{size} bytes, shorter than the 8-byte header length")
        header_len = struct.unpack("<Q", head)[0]
        if header_len > min(size - 8, 100_000_000):
            raise corrupt_error(path, f"header claims {header_len} bytes but the file has {size}")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise corrupt_error(path, f"header is not valid JSON: {err}") from None
    if not isinstance(header, dict):
        raise corrupt_error(path, "header is not a JSON object")
    entries, data_start, spans = {}, 8 + header_len, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise corrupt_error(path, f"bad header entry for {name!r}: {info!r}") from None
        entry = TensorEntry(name, dtype, shape, path, data_start + begin)
        if end - begin != entry.nbytes or min(shape, default=0) < 0:
            raise corrupt_error(path, f"{name!r} spans {end - begin} bytes, its shape needs "
                                 f"{entry.nbytes}")
        entries[name] = entry
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise corrupt_error(path, f"{name!r} starts at byte {begin}, expected {position}")
        position = end
    if data_start + position != size:
        raise corrupt_error(path, f"tensor data needs {data_start + position} bytes, the file "
                             f"has {size}")
    _check_with_safetensors(path)
    return entries


def _check_with_safetensors(path: Path) -> None:
    """Second opinion from the safetensors library itself (header only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as err:
        raise corrupt_error(path, str(err)) from None


def read_block(entry: TensorEntry, row_start: int, row_stop: int, fd: int) -> torch.Tensor:
    """Rows [row_start, row_stop) of a tensor, flattened: 1-D, entry.dtype."""
    per_row = entry.numel // entry.rows if entry.rows else 0
    out = torch.empty((row_stop - row_start) * per_row, dtype=entry.dtype)
    view = memoryview(out.view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    offset, done = entry.offset + row_start * per_row * entry.dtype.itemsize, 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise corrupt_error(entry.file, f"ended inside tensor {entry.name!r}")
        done += got
    return out


class ShardWriter:
    """Writes one safetensors file whose header (names, dtypes, shapes) is known up front;
    tensor bytes then arrive block by block, in the planned order."""

    def __init__(self, path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header, position = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape in layout:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape),
                            "data_offsets": [position, position + nbytes]}
            position += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.path, self.data_bytes, self.written = path, position, 0
        self.handle = open(path, "wb")  # noqa: SIM115 (closed in close())
        self.handle.write(struct.pack("<Q", len(text)) + text)

    def write(self, block: torch.Tensor) -> None:
        if block.numel():
            flat = block.contiguous().reshape(-1)
            self.handle.write(memoryview(flat.view(torch.uint8).numpy()))
            self.written += flat.numel() * flat.dtype.itemsize

    def close(self) -> None:
        if self.written != self.data_bytes:
            raise RuntimeError(f"{self.path}: wrote {self.written} bytes of tensor data, "
                               f"planned {self.data_bytes}")
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()


@dataclass
class Checkpoint:
    """A full set of weights: one safetensors file or shards listed by an index."""
    path: Path
    files: list[Path]
    entries: dict[str, TensorEntry]
    config: dict | None
    is_adapter = False

    @property
    def names(self) -> set[str]:
        return set(self.entries)


def _weight_files(path: Path) -> tuple[list[Path], Path | None]:
    """(safetensors files, index json or None) for a file or model directory."""
    if path.is_file():
        if path.name.endswith(".index.json"):
            return [], path
        if path.suffix == ".safetensors":
            return [path], None
        if path.suffix in PICKLE_SUFFIXES:
            raise UserError(f"{path} is a pickle checkpoint, which is never loaded here; "
                            + CONVERT_HINT)
        raise UserError(f"{path} is not a safetensors file or index; point to a model "
                        "directory, a .safetensors file or a *.safetensors.index.json")
    if (path / INDEX_NAME).is_file():
        return [], path / INDEX_NAME
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return [], indexes[0]
    files = sorted(path.glob("*.safetensors"))
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"], None
    if files:
        return files, None
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(f"{path} holds only pickle weights ({', '.join(pickles[:3])}), which "
                        "are never loaded here; " + CONVERT_HINT)
    raise UserError(f"{path} has no *.safetensors weights; point to a model directory saved "
                    "with save_pretrained or a PEFT adapter directory")


def load_checkpoint(path: Path) -> Checkpoint:
    """Validate the headers of a full checkpoint (file, index or directory); no tensor data."""
    files, index = _weight_files(path)
    entries: dict[str, TensorEntry] = {}
    if index is not None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"{index} is not a valid safetensors index ({err}); re-save the "
                            "checkpoint with save_pretrained") from None
        files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{index} lists shard(s) {missing} that are missing from "
                            f"{index.parent}; copy the complete checkpoint")
    for file in files:
        for name, entry in read_header(file).items():
            if name in entries:
                raise UserError(f"tensor {name!r} appears in both {entries[name].file.name} "
                                f"and {file.name}; keep only one copy of the checkpoint")
            entries[name] = entry
    if index is not None:
        for name, shard in weight_map.items():
            if name not in entries or entries[name].file.name != shard:
                raise corrupt_error(index.parent / shard, f"the index places {name!r} in it, "
                                                     "but its header lacks that tensor")
    root = path if path.is_dir() else path.parent
    config = root / "config.json"
    return Checkpoint(path, files, entries,
                      json.loads(config.read_text()) if config.is_file() else None)
