"""Record how the GPU install resolves: requirements/gpu-resolution.txt.

    python tools/gpu_resolution.py          # needs the package registry, no GPU

Runs pip's resolver in dry-run mode (`pip install --dry-run --report`) for the project with
its `vllm` extra under requirements/constraints-gpu.txt, ignoring this machine's pip
configuration (local wheels, caps), and writes every package it would install with its
version. The file shows that the CUDA pins resolve together; it is not evidence that they
run (nothing here has a GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "requirements" / "gpu-resolution.txt"


def resolve() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        subprocess.run([sys.executable, "-m", "pip", "install", "--isolated", "--dry-run",
                        "--ignore-installed", "--no-cache-dir", "--quiet", "--report",
                        str(report), "-c", str(ROOT / "requirements" / "constraints-gpu.txt"),
                        "-e", f"{ROOT}[vllm,dev]"], check=True, env=env, cwd=ROOT)
        return json.loads(report.read_text())


def main() -> None:
    report = resolve()
    rows = sorted((i["metadata"]["name"].lower(), i["metadata"]["version"])
                  for i in report["install"])
    env = report.get("environment", {})
    where = (f"{env.get('platform_system', '')} {env.get('platform_machine', '')}, Python "
             f"{env.get('python_full_version', '')}, {time.strftime('%-d %b %Y')}")
    lines = ['# The whole project (`pip install -c requirements/constraints-gpu.txt -e ".[vllm,dev]"`)',
             f"# resolved by pip's resolver (--dry-run --report) on {where}, against PyPI alone.",
             "# Regenerate: python tools/gpu_resolution.py (needs the registry). Nothing here ran on a GPU."]
    lines += [f"{name}=={version}" for name, version in rows]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT} ({len(rows)} packages)")


if __name__ == "__main__":
    main()
