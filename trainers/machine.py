"""Device and precision from the machine a job starts on, for the keys its config leaves
out: use_cpu and bf16 (dtype, the weights' precision, stays float32 unless given). The
choice is printed once.

    no CUDA device   use_cpu true, bf16 false
    CUDA devices     use_cpu false, bf16 true where the GPU supports it (bfloat16 mixed
                     precision over float32 weights)

A key the config gives is kept; one that cannot run here (use_cpu false with no CUDA device,
bf16 on a GPU without it) is refused.

The in-process vLLM engine's settings by device (engine_choices; null in the config: chosen
here and recorded, attnrl/rollout/engine_settings.py) and the keys that need a GPU
(check_device_keys: vllm_enable_sleep_mode, flash attention) are decided here too.
"""

from __future__ import annotations

import importlib.util

from attnrl.cli_checks import no_gpu_here
from attnrl.errors import UserError
from attnrl.rollout.engine_settings import device_defaults

ENGINE_KEYS = {"rollout_enforce_eager": "enforce_eager",
               "rollout_enable_chunked_prefill": "enable_chunked_prefill"}
"""Config keys of the engine settings chosen by device -> their name in engine_settings."""
FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
"""attn_implementation values that need a CUDA GPU, and the package each one imports."""


def detect() -> dict:
    """{'cuda': int (visible CUDA devices), 'bf16': bool (every one supports bfloat16)}."""
    if no_gpu_here():
        return {"cuda": 0, "bf16": False}
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"cuda": count, "bf16": bool(count) and torch.cuda.is_bf16_supported()}


def choose(given: dict, machine: dict | None = None) -> tuple[dict, str | None]:
    """The device keys missing from `given` (a config as given: only use_cpu, bf16 and fp16
    are read), chosen for `machine`
    (detect() when None), and the line that says so (None when nothing was chosen).
    UserError when a given key cannot run on this machine."""
    machine = detect() if machine is None else machine
    gpus = machine["cuda"]
    use_cpu = given.get("use_cpu")
    if use_cpu is False and not gpus:
        raise UserError("use_cpu: false, but this machine has no CUDA device; set use_cpu: "
                        "true, or remove the key (the device then follows the machine)")
    on_cpu = bool(use_cpu) or not gpus
    if given.get("bf16") and not on_cpu and not machine["bf16"]:
        raise UserError("bf16: true, but this machine's GPU does not support bfloat16; set "
                        "bf16: false (float32), or fp16: true")
    chosen = {}
    if use_cpu is None:
        chosen["use_cpu"] = on_cpu
    if given.get("bf16") is None and not given.get("fp16"):
        chosen["bf16"] = (not on_cpu) and machine["bf16"]
    if not chosen:
        return chosen, None
    where = "CPU (no CUDA device found)" if not gpus else \
        ("CPU (use_cpu: true)" if on_cpu else f"CUDA ({gpus} visible device(s))")
    settings = ", ".join(f"{k} {str(v).lower()}" for k, v in chosen.items())
    return chosen, (f"device: {where}; chose {settings} (set {', '.join(chosen)} in the "
                    "config to choose yourself)")


def engine_choices(config: dict) -> dict:
    """The in-process vLLM engine's settings the config leaves null (absent or null), for
    the device the job runs on (`config` holds use_cpu, given or chosen)."""
    defaults = device_defaults(cuda=not config["use_cpu"])
    return {key: defaults[name] for key, name in ENGINE_KEYS.items()
            if config.get(key) is None}


def check_device_keys(config: dict) -> None:
    """UserError for a key the device cannot run (`config` holds use_cpu): vLLM's sleep
    mode and flash attention need a CUDA GPU, flash attention also its package."""
    on_cpu = config["use_cpu"]
    if config.get("vllm_enable_sleep_mode") and on_cpu:
        raise UserError("vllm_enable_sleep_mode: true, but the job runs on CPU, where vLLM has "
                        "no sleep mode; remove it (it frees GPU memory during the optimizer "
                        "step)")
    implementation = config.get("attn_implementation")
    package = FLASH_PACKAGES.get(implementation)
    if package and on_cpu:
        raise UserError(f"attn_implementation: {implementation}, but the job runs on CPU; "
                        "use sdpa (or null)")
    if package and importlib.util.find_spec(package) is None:
        raise UserError(f"attn_implementation: {implementation} needs the {package} package, "
                        "which is not installed; install it, or use sdpa (or null)")
