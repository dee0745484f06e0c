"""Device keys a config leaves out are chosen from the machine (trainers/machine.py). The
GPU machines are described, not detected: this machine has no CUDA device."""

import pytest

from attnrl.errors import UserError
from trainers import machine

CPU = {"cuda": 0, "bf16": False}
H100 = {"cuda": 8, "bf16": True}
V100 = {"cuda": 4, "bf16": False}


def test_this_machine_is_detected_as_cpu_only():
    assert machine.detect() == CPU


def test_missing_keys_follow_the_machine_and_are_said_once():
    chosen, line = machine.choose({}, CPU)
    assert chosen == {"use_cpu": True, "bf16": False}
    assert line.startswith("device: CPU (no CUDA device found); chose use_cpu true, bf16 false")
    chosen, line = machine.choose({}, H100)
    assert chosen == {"use_cpu": False, "bf16": True} and "CUDA (8 visible" in line
    assert machine.choose({}, V100)[0] == {"use_cpu": False, "bf16": False}
    assert machine.choose({"fp16": True}, V100)[0] == {"use_cpu": False}


def test_given_keys_are_kept():
    assert machine.choose({"use_cpu": True, "bf16": False}, H100) == ({}, None)
    chosen, line = machine.choose({"use_cpu": True}, H100)
    assert chosen == {"bf16": False} and "CPU (use_cpu: true)" in line
    assert machine.choose({"bf16": True, "use_cpu": True}, CPU) == ({}, None)


@pytest.mark.parametrize("given, where, message", [
    ({"use_cpu": False}, CPU, "use_cpu: false, but this machine has no CUDA device"),
    ({"bf16": True}, V100, "bf16: true, but this machine's GPU does not support bfloat16"),
])
def test_keys_that_cannot_run_here_are_refused(given, where, message):
    with pytest.raises(UserError, match=message):
        machine.choose(given, where)


def test_detection_without_device_files_agrees_with_torch():
    """The fast path (device files, no torch import) must say what torch says here."""
    import torch

    assert machine.no_gpu_here() == (not torch.cuda.is_available())
