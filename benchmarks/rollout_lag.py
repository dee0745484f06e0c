"""Throughput of one-step off-policy generation (rollout_lag 1) against lag 0, on the main
job's recipe, with the vLLM server on one core and the trainer on the other.

    python benchmarks/rollout_lag.py                        # seeds 0 1 2, both lags
    python benchmarks/rollout_lag.py --seeds 0 1 2 3 --max-steps 16
    python benchmarks/rollout_lag.py --aggregate-only       # the table from finished runs

One vLLM CPU server (launch/vllm_server.sh, `taskset -c 0`) serves every run; each run is
`attnrl train --config configs/default.yaml --rollout_engine vllm_server --rollout_lag L
--seed S --eval_size 0` under `taskset -c 1` (held-out evaluation off: it is the same work
at both lags). Runs alternate lags seed by seed; a finished run is skipped and a killed one
resumes (`resume: auto`), so rerunning the command continues. Runs live under
outputs/rollout_lag/; benchmarks/results/rollout_lag_cpu/ gets each run's metrics.jsonl and
log, results.json and table.md:

    per run   steps per hour over steps 2..N (step 1 generates synchronously at both lags),
              the trainer's wait for generation per step (lag 0: the whole generation;
              lag 1: rollout/wait_s), the server's busy time per step and the reward curve
    per lag   mean over seeds; lag 1 / lag 0 throughput with a 95% t interval over seeds
              (paired by seed); the mean training reward of each run, lag 1 - lag 0 with its
              interval over seeds, against the seeds' own spread (sd of a lag's run means)
    GPU model the step time a node would see at lag 0 and 1 when generation is a fraction
              g of a lag-0 step, from this run's measured overheads (weight push, collect)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from _common import write_result

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "rollout_lag_cpu"
RUNS = ROOT / "outputs" / "rollout_lag"
KEY = "rollout-lag-benchmark"
RUN_ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "ATTNRL_ROLLOUT_API_KEY": KEY}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: str, log: Path, core: str) -> tuple[subprocess.Popen, str]:
    """The vLLM CPU server pinned to `core`; returns it and its URL once /health answers."""
    sys.path.insert(0, str(ROOT))
    from attnrl.rollout.server import wait_for_server

    port = free_port()
    env = {**os.environ, **RUN_ENV}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    handle = open(log, "a")  # noqa: SIM115  (the server writes to it after this returns)
    proc = subprocess.Popen(
        ["taskset", "-c", core, "bash", str(ROOT / "launch" / "vllm_server.sh"), "--model",
         model, "--port", str(port), "--dtype", "float32", "--max-model-len", "1024",
         "--kv-cache-gib", "1"], stdout=handle, stderr=subprocess.STDOUT, env=env,
        cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_for_server(url, timeout=900, api_key=KEY)
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def train(url: str, lag: int, seed: int, max_steps: int, core: str) -> None:
    name = f"lag{lag}_seed{seed}"
    out, folder = RUNS / name, RESULTS / name
    folder.mkdir(parents=True, exist_ok=True)
    command = ["taskset", "-c", core, str(ROOT / ".venv/bin/attnrl"), "train", "--config",
               "configs/default.yaml", "--rollout_engine", "vllm_server",
               "--rollout_server_url", url, "--rollout_lag", str(lag), "--seed", str(seed),
               "--eval_size", "0", "--max_steps", str(max_steps), "--report_to", "none",
               "--save_steps", str(max_steps), "--run_name", name, "--output_dir", str(out)]
    print(f"{name}: {' '.join(command[3:])}", flush=True)
    with open(folder / "log.txt", "a") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                               env={**os.environ, **RUN_ENV})
    if code != 0:
        sys.exit(f"{name} failed (exit {code}); see {folder / 'log.txt'}; rerun to resume it")
    text = (out / "metrics.jsonl").read_text().replace(f"{ROOT}/", "")
    (folder / "metrics.jsonl").write_text(text)
    log = (folder / "log.txt").read_text().replace(f"{ROOT}/", "").replace(str(ROOT), ".")
    (folder / "log.txt").write_text(log)
    for path in [out / "final", *out.glob("checkpoint-*")]:
        shutil.rmtree(path, ignore_errors=True)


def run_summary(folder: Path) -> dict | None:
    """One finished run's numbers from its metrics.jsonl (None when not finished)."""
    path = folder / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "reward" in r and "step_time" in r]
    if not steps:
        return None
    steady = steps[1:]
    seconds = sum(r["step_time"] for r in steady)
    wait = [r.get("rollout/wait_s", r.get("time/generation", 0.0)) for r in steady]
    busy = [r.get("rollout/generate_s", r.get("time/generation", 0.0)) for r in steady]
    boundary = [r.get("time/generation", 0.0) for r in steady]
    return {"steps": len(steps), "steady_steps": len(steady),
            "steps_per_hour": 3600 * len(steady) / seconds if seconds else None,
            "step_s": seconds / len(steady) if steady else None,
            "trainer_wait_s": sum(wait) / len(wait) if wait else None,
            "boundary_s": sum(boundary) / len(boundary) if boundary else None,
            "server_busy_s": sum(busy) / len(busy) if busy else None,
            "reward_curve": [r["reward"] for r in steps],
            "mean_reward": sum(r["reward"] for r in steps) / len(steps),
            "mean_completion_tokens": sum(r.get("completions/mean_length", 0.0)
                                          for r in steady) / max(1, len(steady))}


def aggregate(seeds: list[int]) -> dict:
    sys.path.insert(0, str(ROOT))
    from attnrl.analysis.stats import t_interval

    runs = {lag: {s: run_summary(RESULTS / f"lag{lag}_seed{s}") for s in seeds} for lag in (0, 1)}
    runs = {lag: {s: r for s, r in by.items() if r} for lag, by in runs.items()}
    paired = sorted(set(runs[0]) & set(runs[1]))
    result = {"seeds": seeds, "paired_seeds": paired,
              "runs": {f"lag{lag}": runs[lag] for lag in (0, 1)}}
    per_lag = {}
    for lag in (0, 1):
        values = list(runs[lag].values())
        if values:
            per_lag[lag] = {key: sum(v[key] for v in values) / len(values) for key in
                            ("steps_per_hour", "step_s", "trainer_wait_s", "server_busy_s",
                             "boundary_s", "mean_reward")}
            per_lag[lag]["reward_sd_over_seeds"] = t_interval(
                [v["mean_reward"] for v in values])["sd"]
    result["per_lag"] = {f"lag{lag}": v for lag, v in per_lag.items()}
    if paired:
        ratio = t_interval([runs[1][s]["steps_per_hour"] / runs[0][s]["steps_per_hour"]
                            for s in paired])
        reward = t_interval([runs[1][s]["mean_reward"] - runs[0][s]["mean_reward"]
                             for s in paired])
        result["throughput_ratio"] = ratio
        result["reward_difference"] = reward
        result["verdict"] = verdict(ratio, reward, per_lag, len(paired))
        result["gpu_model"] = gpu_model(per_lag)
    return result


def verdict(ratio: dict, reward: dict, per_lag: dict, seeds: int) -> str:
    speed = (f"lag 1 runs {ratio['mean']:.2f}x the steps per hour of lag 0"
             + (f" (95% t interval over {seeds} seeds {ratio['low']:.2f} to {ratio['high']:.2f})"
                if ratio["low"] is not None else f" ({seeds} seed, no interval)"))
    target = "meets" if ratio["low"] is not None and ratio["low"] >= 1.3 else \
        "does not show" if ratio["low"] is not None else "cannot yet show"
    spread = max((per_lag[lag].get("reward_sd_over_seeds") or 0.0) for lag in per_lag)
    if reward["low"] is None:
        curve = f"reward difference {reward['mean']:+.3f} (one seed: no interval)"
    else:
        inside = abs(reward["mean"]) <= spread
        curve = (f"mean training reward lag 1 - lag 0 {reward['mean']:+.3f} (95% t interval "
                 f"{reward['low']:+.3f} to {reward['high']:+.3f}); the seeds' own spread "
                 f"(sd of a lag's run means) is {spread:.3f}, so the curves are "
                 f"{'within' if inside else 'outside'} it")
    return f"{speed}; it {target} the >= 1.3 target with its lower bound. {curve}."


def gpu_model(per_lag: dict) -> dict:
    """Step time at lag 0 is G + T (generation, then training); at lag 1 it is
    max(G, T + o) + c, where o is the weight push (the trainer's side of the boundary,
    measured here as boundary time minus wait) and c the collect overhead. With g = G / (G +
    T) the predicted speed-up is 1 / (max(g, 1 - g + o') + c'), o' and c' as fractions of the
    lag-0 step measured here."""
    lag0, lag1 = per_lag.get(0), per_lag.get(1)
    if not lag0 or not lag1:
        return {}
    step0 = lag0["step_s"]
    push = max(0.0, (lag1["boundary_s"] or 0.0) - (lag1["trainer_wait_s"] or 0.0)) / step0
    out = {"push_fraction_of_lag0_step": push}
    for g in (0.6, 0.7, 0.8):
        out[f"speedup_at_generation_{g:.1f}"] = 1.0 / (max(g, 1.0 - g + push))
    return out


def table(result: dict) -> str:
    lines = [("| run | steps/h (2..N) | step s | trainer waits s/step | server busy s/step | "
              "completion tokens | mean reward |"), "|---|---|---|---|---|---|---|"]
    for lag in ("lag0", "lag1"):
        for seed, r in sorted(result["runs"][lag].items()):
            lines.append(f"| {lag} seed {seed} | {r['steps_per_hour']:.0f} | {r['step_s']:.1f} "
                         f"| {r['trainer_wait_s']:.1f} | {r['server_busy_s']:.1f} | "
                         f"{r['mean_completion_tokens']:.1f} | {r['mean_reward']:.3f} |")
    if "verdict" in result:
        lines += ["", result["verdict"]]
        model = result.get("gpu_model") or {}
        if model:
            lines += ["", "GPU node model (generation g of a lag-0 step; weight push "
                      f"{model['push_fraction_of_lag0_step']:.2f} of a step as measured): "
                      + ", ".join(f"g = {k[-3:]}: {v:.2f}x" for k, v in model.items()
                                  if k.startswith("speedup"))]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=16, help="the main job's 16")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--aggregate-only", action="store_true")
    args = parser.parse_args()
    if not args.aggregate_only:
        sys.path.insert(0, str(ROOT))
        from attnrl.models import resolve_model

        RESULTS.mkdir(parents=True, exist_ok=True)
        todo = [(lag, s) for s in args.seeds for lag in (0, 1)
                if run_summary(RESULTS / f"lag{lag}_seed{s}") is None]
        if todo:
            RUNS.mkdir(parents=True, exist_ok=True)
            server, url = start_server(str(resolve_model(args.model)),
                                       RUNS / "server_log.txt", "0")
            try:
                for lag, seed in todo:
                    start = time.time()
                    train(url, lag, seed, args.max_steps, "1")
                    print(f"lag{lag}_seed{seed}: {time.time() - start:.0f} s", flush=True)
            finally:
                stop_server(server)
    result = aggregate(args.seeds)
    write_result(RESULTS / "results.json", result)
    text = table(result)
    (RESULTS / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
