"""Reasoning-vector merge: time and peak RSS, streaming vs loading all three checkpoints.

Three SmolLM2-135M-sized float32 checkpoints are made from resolve_model('smollm2'):
SFT = the model itself, RL = SFT + small noise, target = SFT + other noise. Every variant runs
in its own subprocess and reports its own peak RSS: VmHWM from /proc/self/status, which
belongs to the process's address space and starts fresh at exec (ru_maxrss of a child, as
given by wait4 or RUSAGE_CHILDREN, also counts the pages of the parent copied at fork).
Input files are read once beforehand so every run reads from the page cache; both variants
fsync their output. Streaming runs with the default block size and an 8x larger one.

    .venv/bin/python benchmarks/merge.py            # SmolLM2-sized (about 3 GB of temp disk)
    .venv/bin/python benchmarks/merge.py --quick    # small synthetic checkpoints

Target: streaming peak RSS <= 1.5 x the largest tensor + the fixed overhead (the RSS of a
process that only imports torch and attnrl.merge), far below one model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import proc_status_mb, write_result

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# ------------------------------------------------------------------------ workers

def worker(mode: str, rl: str, sft: str, target: str, out: str, chunk: int) -> None:
    """Runs in a child process; prints {"seconds": ...} for the merge itself."""
    import torch  # noqa: F401  (imported by every mode: part of the fixed overhead)

    from attnrl.merge import merge_checkpoints

    rss_before = proc_status_mb()
    started = time.perf_counter()
    if mode == "streaming":
        merge_checkpoints(rl, sft, target, out, chunk_elements=chunk, progress=False)
    elif mode == "in_memory":
        from safetensors.torch import load_file, save_file

        def load_all(path):
            tensors = {}
            for file in sorted(Path(path).glob("*.safetensors")):
                tensors.update(load_file(file))
            return tensors

        rl_t, sft_t, target_t = load_all(rl), load_all(sft), load_all(target)
        merged = {k: (t.float() + 1.0 * (rl_t[k].float() - sft_t[k].float())).to(t.dtype)
                  for k, t in target_t.items()}
        os.makedirs(out)
        save_file(merged, f"{out}/model.safetensors", metadata={"format": "pt"})
        with open(f"{out}/model.safetensors", "rb") as handle:
            os.fsync(handle.fileno())
    elif mode != "baseline":
        raise SystemExit(f"unknown worker mode {mode}")
    print(json.dumps({"seconds": time.perf_counter() - started, "rss_before_mb": rss_before,
                      "peak_rss_mb": proc_status_mb("VmHWM")}))


def run_worker(mode: str, paths: dict, out: Path, chunk: int) -> dict:
    """One child process; returns its merge seconds and peak RSS (MB)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--worker", mode, "--chunk-elements", str(chunk),
           paths["rl"], paths["sft"], paths["target"], str(out)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, cwd=REPO, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"worker {mode} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


# ------------------------------------------------------------------------ inputs

def make_inputs(root: Path, quick: bool) -> dict:
    """SFT / RL / target dirs; RL and target are SFT plus seeded noise."""
    import torch
    from safetensors.torch import load_file, save_file

    if quick:
        gen = torch.Generator().manual_seed(0)
        shapes = {"embed.weight": (8192, 512), **{f"layers.{i}.proj.weight": (1024, 512)
                                                  for i in range(8)}, "norm.weight": (512,)}
        sft_t = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
        sft = root / "sft"
        sft.mkdir()
        save_file(sft_t, sft / "model.safetensors", metadata={"format": "pt"})
    else:
        from attnrl.models import resolve_model

        sft = resolve_model("smollm2")
        sft_t = {}
        for file in sorted(sft.glob("*.safetensors")):
            sft_t.update(load_file(file))
    paths = {"sft": str(sft)}
    for seed, role in ((1, "rl"), (2, "target")):
        gen = torch.Generator().manual_seed(seed)
        path = root / role
        shutil.copytree(sft, path, ignore=shutil.ignore_patterns("*.safetensors*"))
        save_file({k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in sft_t.items()},
                  path / "model.safetensors", metadata={"format": "pt"})
        paths[role] = str(path)
    sizes = [v.numel() * v.element_size() for v in sft_t.values()]
    paths["largest_tensor_mb"] = max(sizes) / 2**20
    paths["model_mb"] = sum(sizes) / 2**20
    paths["tensors"] = len(sizes)
    return paths


def warm_page_cache(paths: dict) -> None:
    for role in ("rl", "sft", "target"):
        for file in Path(paths[role]).glob("*.safetensors"):
            with open(file, "rb") as handle:
                while handle.read(1 << 24):
                    pass


def outputs_equal(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    def load_all(path):
        tensors = {}
        for file in sorted(path.glob("*.safetensors")):
            tensors.update(load_file(file))
        return tensors

    left, right = load_all(a), load_all(b)
    return left.keys() == right.keys() and all(
        left[k].dtype == right[k].dtype and left[k].equal(right[k]) for k in left)


# ------------------------------------------------------------------------ main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small synthetic checkpoints")
    parser.add_argument("--repeats", type=int, default=None, help="runs per variant (min time, "
                        "max RSS); default 3, 1 with --quick")
    parser.add_argument("--chunk-elements", type=int, default=None,
                        help="streaming block size in elements (default: library default)")
    parser.add_argument("--json", default=str(REPO / "benchmarks/results/merge.json"))
    parser.add_argument("--workdir", default=None, help="temp dir (default: system temp)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from attnrl.merge import DEFAULT_CHUNK_ELEMENTS

    chunk = args.chunk_elements or DEFAULT_CHUNK_ELEMENTS
    if args.worker:
        worker(args.worker, *args.paths, chunk)
        return 0
    repeats = args.repeats or (1 if args.quick else 3)
    root = Path(tempfile.mkdtemp(prefix="attnrl-merge-bench-", dir=args.workdir))
    try:
        paths = make_inputs(root, args.quick)
        warm_page_cache(paths)
        variants = [("baseline", chunk), ("streaming", chunk), ("streaming", chunk * 8),
                    ("in_memory", chunk)]
        rows = []
        for mode, size in variants:
            runs = [run_worker(mode, paths, root / f"out_{mode}_{size}", size)
                    for _ in range(repeats)]
            rows.append({"variant": mode if mode != "streaming" else f"streaming (chunk {size})",
                         "mode": mode, "chunk_elements": size,
                         "seconds": min(r["seconds"] for r in runs),
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                         "rss_before_merge_mb": max(r["rss_before_mb"] for r in runs)})
            print(f"  {rows[-1]['variant']}: {rows[-1]['seconds']:.2f} s, "
                  f"{rows[-1]['peak_rss_mb']:.0f} MB", flush=True)
        same = outputs_equal(root / f"out_streaming_{chunk}", root / f"out_in_memory_{chunk}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = rows[0]["peak_rss_mb"]
    stream = rows[1]["peak_rss_mb"]
    budget = base + 1.5 * paths["largest_tensor_mb"]
    report = {
        "setup": "quick synthetic" if args.quick else "SmolLM2-135M-sized float32 x3",
        "tensors": paths["tensors"], "model_mb": paths["model_mb"],
        "largest_tensor_mb": paths["largest_tensor_mb"], "repeats": repeats,
        "rows": rows, "streaming_equals_in_memory": same,
        "rss_budget_mb": budget, "streaming_within_budget": stream <= budget,
        "streaming_over_overhead_mb": stream - base,
        "in_memory_over_overhead_mb": rows[-1]["peak_rss_mb"] - base,
        "cpu_count": os.cpu_count(),
    }
    print(f"{report['setup']}: {paths['tensors']} tensors, {paths['model_mb']:.0f} MB per model, "
          f"largest tensor {paths['largest_tensor_mb']:.0f} MB")
    print(f"{'variant':<28}{'seconds':>9}{'peak RSS MB':>13}{'RSS before merge':>18}"
          f"{'peak - baseline peak':>22}")
    for row in rows:
        print(f"{row['variant']:<28}{row['seconds']:>9.2f}{row['peak_rss_mb']:>13.0f}"
              f"{row['rss_before_merge_mb']:>18.0f}{row['peak_rss_mb'] - base:>22.0f}")
    print(f"budget (overhead + 1.5 x largest tensor): {budget:.0f} MB -> streaming "
          f"{'within' if report['streaming_within_budget'] else 'OVER'}; outputs identical: "
          f"{same}")
    write_result(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
