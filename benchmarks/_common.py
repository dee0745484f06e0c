"""Shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this directory
is on sys.path): process memory from /proc and the JSON result file."""

import json
from pathlib import Path


def proc_status_mb(field: str = "VmRSS") -> float:
    """A memory line of /proc/self/status in MiB: VmRSS (now) or VmHWM (peak RSS)."""
    with open("/proc/self/status") as handle:
        line = next(x for x in handle if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux: clear_refs 5), so a
    later VmHWM reading covers only what ran after; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def write_result(path, result: dict) -> Path:
    """Write the benchmark's JSON (parents created) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return path
