"""Reasoning-vector merge: real safetensors files in, real safetensors files out.

References are plain in-memory arithmetic on tensors loaded with safetensors.torch.load_file
(and peft's own merge_and_unload for adapters); merged models are loaded with transformers.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from attnrl.cli import main as cli_main
from attnrl.errors import UserError
from attnrl.merge import merge_checkpoints, parse_size

REPO = Path(__file__).resolve().parents[2]
SHAPES = {"embed.weight": (37, 16), "layers.0.proj.weight": (300, 24), "layers.0.norm.weight": (24,),
          "layers.1.proj.weight": (16, 300), "layers.1.conv": (3, 5, 7), "scale": ()}


# ------------------------------------------------------------------------ helpers

def random_tensors(seed: int, dtype=torch.float32, shapes=SHAPES) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen).to(dtype) for name, shape in shapes.items()}


def write_checkpoint(path: Path, tensors: dict, shards: int = 1) -> Path:
    """A model dir: model.safetensors, or `shards` files + model.safetensors.index.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "toy", "architectures": ["Toy"]}))
    if shards == 1:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return path
    names, weight_map = sorted(tensors), {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def reference(target: dict, rl: dict, sft: dict, alpha: float) -> dict:
    """theta_target + alpha * (theta_rl - theta_sft) in float32, cast to the target dtype."""
    return {k: (t.float() + alpha * (rl[k].float() - sft[k].float())).to(t.dtype)
            for k, t in target.items()}


def assert_bitwise_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, expected in want.items():
        assert got[name].dtype == expected.dtype, name
        assert got[name].shape == expected.shape, name
        assert torch.equal(got[name].reshape(-1).view(torch.uint8),
                           expected.reshape(-1).view(torch.uint8)), name


def work_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.merge-*"))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """RL / SFT / target float32 checkpoints (single file and 3 shards) of SHAPES."""
    root = tmp_path_factory.mktemp("toy")
    tensors = {role: random_tensors(seed) for seed, role in enumerate(("rl", "sft", "target"))}
    for role, t in tensors.items():
        write_checkpoint(root / role, t)
        write_checkpoint(root / f"{role}_sharded", t, shards=3)
    return root, tensors


# ------------------------------------------------------------------------ arithmetic

@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_in_memory_arithmetic(tmp_path, sharded, dtype):
    shards = 3 if sharded else 1
    for seed, alpha in enumerate([1.0, 0.37, -1.0, 2.5]):
        sources = {role: random_tensors(10 * seed + i, dtype)
                   for i, role in enumerate(("rl", "sft", "target"))}
        dirs = {role: write_checkpoint(tmp_path / f"{role}{seed}", t, shards)
                for role, t in sources.items()}
        out = tmp_path / f"out{seed}"
        summary = merge_checkpoints(dirs["rl"], dirs["sft"], dirs["target"], out, alpha=alpha,
                                    max_shard_bytes=20_000, chunk_elements=97, progress=False)
        want = reference(sources["target"], sources["rl"], sources["sft"], alpha)
        assert_bitwise_equal(load_dir(out), want)
        assert sorted(summary.combined) == sorted(SHAPES)
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(SHAPES)
        assert len(set(index["weight_map"].values())) == summary.shards > 1
        assert index["metadata"]["total_size"] == sum(
            t.numel() * t.element_size() for t in want.values())
        assert (out / "config.json").read_text() == (dirs["target"] / "config.json").read_text()


def test_alpha_zero_reproduces_target_bitwise(tmp_path, toy):
    root, _ = toy
    for dtype in (torch.float32, torch.bfloat16):
        target = write_checkpoint(tmp_path / f"t_{dtype}", random_tensors(7, dtype))
        out = tmp_path / f"out_{dtype}"
        merge_checkpoints(root / "rl", root / "sft_sharded", target, out, alpha=0.0,
                          progress=False)
        assert_bitwise_equal(load_dir(out), load_dir(target))


def test_alpha_minus_one_subtracts_and_undoes_plus_one(tmp_path, toy):
    root, t = toy
    merge_checkpoints(root / "rl", root / "sft", root / "target", tmp_path / "plus", alpha=1.0,
                      progress=False)
    merge_checkpoints(root / "rl_sharded", root / "sft", tmp_path / "plus", tmp_path / "back",
                      alpha=-1.0, chunk_elements=50, progress=False)
    merge_checkpoints(root / "rl", root / "sft", root / "target", tmp_path / "minus", alpha=-1.0,
                      progress=False)
    assert_bitwise_equal(load_dir(tmp_path / "minus"),
                         {k: v - (t["rl"][k] - t["sft"][k]) for k, v in t["target"].items()})
    back = load_dir(tmp_path / "back")
    for name, want in t["target"].items():
        torch.testing.assert_close(back[name], want, atol=1e-5, rtol=0)


def test_mixed_input_dtypes_compute_in_float32(tmp_path):
    rl, sft, target = random_tensors(1, torch.bfloat16), random_tensors(2), random_tensors(3,
                                                                                torch.float16)
    dirs = [write_checkpoint(tmp_path / n, t) for n, t in zip(("rl", "sft", "t"), (rl, sft, target))]
    merge_checkpoints(*dirs, tmp_path / "out", alpha=0.5, progress=False)
    assert_bitwise_equal(load_dir(tmp_path / "out"), reference(target, rl, sft, 0.5))


def test_mismatched_missing_excluded_and_non_float_tensors_are_copied_and_listed(tmp_path):
    target = random_tensors(3) | {"ids": torch.arange(10), "only_target": torch.ones(4)}
    rl = random_tensors(1) | {"extra_rl": torch.zeros(2)}
    sft = random_tensors(2)
    rl["embed.weight"] = torch.randn(40, 16)  # resized vocabulary on the RL side
    del sft["layers.1.conv"]
    dirs = [write_checkpoint(tmp_path / n, t) for n, t in zip(("rl", "sft", "t"), (rl, sft, target))]
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"1 of 3 tensors .* differ in shape .*embed\.weight"
                                         r".*--allow-partial"):
        merge_checkpoints(*dirs, out, exclude=[r"norm\.", r"^scale$"], progress=False)
    assert not out.exists()
    summary = merge_checkpoints(*dirs, out, exclude=[r"norm\.", r"^scale$"], progress=False,
                                allow_partial=True)
    copied = {"embed.weight", "layers.1.conv", "layers.0.norm.weight", "scale", "ids",
              "only_target"}
    want = reference({k: v for k, v in target.items() if k not in copied}, rl, sft, 1.0)
    want |= {k: target[k] for k in copied}
    assert_bitwise_equal(load_dir(out), want)
    assert sorted(summary.combined) == ["layers.0.proj.weight", "layers.1.proj.weight"]
    assert summary.shape_mismatch == [{"name": "embed.weight", "target": [37, 16],
                                       "rl": [[40, 16]], "sft": [[37, 16]]}]
    assert {m["name"]: m["missing_from"] for m in summary.missing} == {
        "layers.1.conv": ["sft"], "only_target": ["rl", "sft"]}
    assert sorted(summary.excluded) == ["layers.0.norm.weight", "scale"]
    assert summary.not_float == ["ids"]
    assert summary.not_in_target == [{"name": "extra_rl", "source": "rl"}]
    assert json.loads((out / "merge_summary.json").read_text()) == summary.to_json()
    text = summary.render()
    assert "shape mismatch" in text and "embed.weight" in text and "excluded" in text


def test_quantized_checkpoints_are_refused(tmp_path, capsys):
    """float8 tensors, integer weights and weights with a quantization scale beside them
    hold raw quantized units: the merge stops with one line naming tensor and dtype,
    before writing anything; excluded, such a tensor is copied from the target."""
    fp8 = "layers.0.proj.weight"
    cases = {  # role -> (tensors to put in that checkpoint, expected message)
        "target": ({fp8: torch.randn(300, 24).to(torch.float8_e4m3fn)},
                   rf"target tensor '{fp8}' in .* is stored as float8_e4m3fn"),
        "rl": ({fp8: torch.randn(300, 24).to(torch.float8_e4m3fn),
                "layers.0.proj.weight_scale_inv": torch.ones(3, 1)},
               rf"RL tensor '{fp8}' in .* is stored as float8_e4m3fn"),
        "sft": ({"layers.1.proj.weight": torch.randint(-8, 8, (16, 300), dtype=torch.int8)},
                r"SFT tensor 'layers.1.proj.weight' in .* is an integer weight \(int8\)"),
        "rl_scaled": ({"layers.1.proj.weight_scale": torch.ones(16, 1)},
                      (r"RL tensor 'layers.1.proj.weight' in .* \(float32\) has the "
                       r"quantization tensor 'weight_scale' beside it")),
    }
    for case, (tensors, message) in cases.items():
        role = case.split("_")[0]
        parts = {r: random_tensors(seed) for seed, r in enumerate(("rl", "sft", "target"))}
        parts[role] |= tensors
        root = tmp_path / case
        dirs = [write_checkpoint(root / r, parts[r]) for r in ("rl", "sft", "target")]
        out = root / "out"
        code = cli_main(["merge", "--rl", str(dirs[0]), "--sft", str(dirs[1]), "--target",
                         str(dirs[2]), "--out", str(out), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2, (case, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert re.search(message, err), (case, err)
        assert not out.exists() and not work_dirs(out)
    # excluded, the float8 tensor of the target is copied bitwise, the rest combined
    parts = {r: random_tensors(seed) for seed, r in enumerate(("rl", "sft", "target"))}
    parts["target"][fp8] = torch.randn(300, 24).to(torch.float8_e4m3fn)
    dirs = [write_checkpoint(tmp_path / "excluded" / r, parts[r])
            for r in ("rl", "sft", "target")]
    summary = merge_checkpoints(*dirs, tmp_path / "excluded" / "out", exclude=[r"layers\.0\.proj"],
                                progress=False)
    merged = load_dir(tmp_path / "excluded" / "out")
    assert merged[fp8].dtype == torch.float8_e4m3fn
    assert torch.equal(merged[fp8].view(torch.uint8), parts["target"][fp8].view(torch.uint8))
    assert summary.excluded == [fp8] and "layers.1.proj.weight" in summary.combined


# ------------------------------------------------------------------------ real models

def _perturbed_copy(src: Path, dst: Path, seed: int, scale: float, max_shard_size=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(dst, **kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """SFT (a saved tiny Llama), RL = SFT + noise saved in shards, target = another seed."""
    from attnrl.models import save_tiny_model

    root = tmp_path_factory.mktemp("tiny_merge")
    sft = save_tiny_model(root / "sft", seed=0, num_layers=2, num_heads=4, num_kv_heads=2)
    rl = _perturbed_copy(sft, root / "rl", seed=1, scale=0.01, max_shard_size="150KB")
    target = save_tiny_model(root / "target", seed=5, num_layers=2, num_heads=4, num_kv_heads=2)
    assert (rl / "model.safetensors.index.json").is_file()
    return sft, rl, target


def test_tiny_transformers_model_merges_loads_and_generates(tmp_path, tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft, rl, target = tiny_models
    out = tmp_path / "merged"
    summary = merge_checkpoints(rl, sft, target, out, alpha=0.8, max_shard_bytes="200KB",
                                progress=False)
    want = reference(load_dir(target), load_dir(rl), load_dir(sft), 0.8)
    assert_bitwise_equal(load_dir(out), want)
    assert summary.shards > 1 and len(summary.combined) == len(want)
    assert {"config.json", "tokenizer.json", "generation_config.json"} <= set(
        summary.copied_files)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, param in model.state_dict().items():
        assert torch.equal(param, want[name]), name
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Question: What is 3 + 4?", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 5)


def _lora_adapter(base_dir: Path, out_dir: Path, seed: int, **lora_kwargs) -> dict:
    """Save a randomly initialised PEFT LoRA adapter on `base_dir`; return peft's own merged
    state dict (base + delta) as the reference."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, **{
        "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
        **lora_kwargs})
    get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config).save_pretrained(out_dir)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                       out_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


LORA_VARIANTS = {
    "plain": {},
    "rslora_alpha_pattern": {"use_rslora": True, "r": 8, "alpha_pattern": {"v_proj": 3}},
    "embedding_and_modules_to_save": {"target_modules": ["q_proj", "embed_tokens"],
                                      "modules_to_save": ["lm_head"]},
}


@pytest.mark.parametrize("variant", sorted(LORA_VARIANTS))
def test_lora_adapter_as_rl_matches_peft_merge(tmp_path, tiny_models, variant):
    sft, _, target = tiny_models
    adapter = tmp_path / "adapter"
    rl_merged = _lora_adapter(sft, adapter, seed=3, **LORA_VARIANTS[variant])
    assert (adapter / "adapter_config.json").is_file()
    out = tmp_path / "out"
    summary = merge_checkpoints(adapter, sft, target, out, alpha=1.5, chunk_elements=100,
                                progress=False)
    sft_t, target_t = load_dir(sft), load_dir(target)
    got = load_dir(out)
    assert summary.rl_kind == "lora_adapter" and summary.combined
    for name, t in target_t.items():
        want = t + 1.5 * (rl_merged[name] - sft_t[name])
        torch.testing.assert_close(got[name], want, atol=1e-5, rtol=0)
        if name not in summary.combined:  # untouched by the adapter: a plain copy
            assert name in summary.zero_vector and torch.equal(got[name], t)
    touched = {k for k in target_t if not torch.equal(rl_merged[k], sft_t[k])}
    assert touched and touched <= set(summary.combined)


def test_lora_adapter_as_sft_and_two_adapters(tmp_path, tiny_models):
    sft, rl, target = tiny_models
    target_t, rl_t = load_dir(target), load_dir(rl)
    # SFT adapter trained on the RL weights: v = rl - (rl + delta) = -delta.
    sft_merged = _lora_adapter(rl, tmp_path / "sft_adapter", seed=4)
    merge_checkpoints(rl, tmp_path / "sft_adapter", target, tmp_path / "out1", progress=False)
    got = load_dir(tmp_path / "out1")
    for name, t in target_t.items():
        torch.testing.assert_close(got[name], t + (rl_t[name] - sft_merged[name]), atol=1e-5,
                                   rtol=0)
    # Two adapters on one base: v = delta_rl - delta_sft.
    a_merged = _lora_adapter(sft, tmp_path / "a", seed=5)
    b_merged = _lora_adapter(sft, tmp_path / "b", seed=6,
                             target_modules=["q_proj", "k_proj", "up_proj"])
    summary = merge_checkpoints(tmp_path / "a", tmp_path / "b", target, tmp_path / "out2",
                                alpha=0.5, progress=False)
    got = load_dir(tmp_path / "out2")
    for name, t in target_t.items():
        torch.testing.assert_close(got[name], t + 0.5 * (a_merged[name] - b_merged[name]),
                                   atol=1e-5, rtol=0)
    assert any(".k_proj." in n for n in summary.combined)  # only the SFT adapter touches k
    # A full lm_head saved by one adapter only: the shared base would be needed -> copied.
    _lora_adapter(sft, tmp_path / "c", seed=7, modules_to_save=["lm_head"])
    summary = merge_checkpoints(tmp_path / "c", tmp_path / "a", target, tmp_path / "out3",
                                progress=False)
    assert summary.needs_base == ["lm_head.weight"]
    assert torch.equal(load_dir(tmp_path / "out3")["lm_head.weight"], target_t["lm_head.weight"])


def test_dora_adapter_is_refused(tmp_path, tiny_models):
    sft, _, target = tiny_models
    _lora_adapter(sft, tmp_path / "dora", seed=1, use_dora=True)
    with pytest.raises(UserError, match="DoRA, not plain LoRA"):
        merge_checkpoints(tmp_path / "dora", sft, target, tmp_path / "out", progress=False)


# ------------------------------------------------------------------------ bad input

def test_truncated_or_corrupt_shard_is_a_clear_error(tmp_path, toy):
    root, _ = toy
    bad = tmp_path / "bad"
    shutil.copytree(root / "rl_sharded", bad)
    shard = bad / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(UserError, match="model-00002-of-00003.safetensors is truncated"):
        merge_checkpoints(bad, root / "sft", root / "target", tmp_path / "out", progress=False)
    shard.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(UserError, match="model-00002-of-00003.safetensors .*corrupt"):
        merge_checkpoints(bad, root / "sft", root / "target", tmp_path / "out", progress=False)
    shard.unlink()
    with pytest.raises(UserError, match="missing"):
        merge_checkpoints(bad, root / "sft", root / "target", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not work_dirs(tmp_path / "out")


def test_pickle_checkpoints_are_refused(tmp_path, toy):
    root, tensors = toy
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(tensors["rl"], pickled / "pytorch_model.bin")
    for path in (pickled, pickled / "pytorch_model.bin"):
        with pytest.raises(UserError, match="convert it to safetensors"):
            merge_checkpoints(path, root / "sft", root / "target", tmp_path / "o", progress=False)


def test_mismatched_checkpoints_are_clear_errors(tmp_path, toy, tiny_models):
    from attnrl.models import save_tiny_model

    root, _ = toy
    sft, rl, target = tiny_models
    other = write_checkpoint(tmp_path / "other", {"foo": torch.zeros(3)})
    with pytest.raises(UserError, match="no tensor names in common"):
        merge_checkpoints(root / "rl", other, root / "target", tmp_path / "o", progress=False)
    qwen = save_tiny_model(tmp_path / "qwen", arch="qwen2", num_layers=2, num_heads=4,
                           num_kv_heads=2)
    with pytest.raises(UserError, match="architecture mismatch.*qwen2"):
        merge_checkpoints(qwen, sft, target, tmp_path / "o", progress=False)
    wide = write_checkpoint(tmp_path / "wide", random_tensors(9, shapes={
        k: tuple(d + 1 for d in s) for k, s in SHAPES.items() if s}))
    with pytest.raises(UserError, match="no tensor has the same shape"):
        merge_checkpoints(root / "rl", root / "sft", wide, tmp_path / "o", progress=False)
    _lora_adapter(sft, tmp_path / "adapter", seed=1)
    with pytest.raises(UserError, match="target .* is a LoRA adapter"):
        merge_checkpoints(rl, sft, tmp_path / "adapter", tmp_path / "o", progress=False)
    with pytest.raises(UserError, match="trained on a LlamaForCausalLM, but the target is Toy"):
        merge_checkpoints(tmp_path / "adapter", root / "sft", root / "target", tmp_path / "o",
                          progress=False)
    no_config = write_checkpoint(tmp_path / "no_config", random_tensors(4))
    (no_config / "config.json").unlink()
    with pytest.raises(UserError, match="touches no tensor of the target"):
        merge_checkpoints(tmp_path / "adapter", root / "sft", no_config, tmp_path / "o",
                          progress=False)
    with pytest.raises(UserError, match="not a valid regular expression"):
        merge_checkpoints(rl, sft, target, tmp_path / "o", exclude="(", progress=False)
    with pytest.raises(UserError, match="would overwrite the target"):
        merge_checkpoints(rl, sft, target, target, force=True, progress=False)
    with pytest.raises(UserError, match="does not exist"):
        merge_checkpoints(tmp_path / "nope", sft, target, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5 MiB") == int(1.5 * 2**20)
    assert parse_size(4096) == 4096
    for bad in ("", "-1GB", "12 parsecs", "0"):
        with pytest.raises(UserError, match="not a positive size"):
            parse_size(bad)


def test_existing_out_needs_force_and_cli_exits_2(tmp_path, toy, capsys):
    root, t = toy
    out = tmp_path / "out"
    args = ["merge", "--rl", str(root / "rl"), "--sft", str(root / "sft"), "--target",
            str(root / "target"), "--out", str(out), "--quiet"]
    assert cli_main(args) == 0
    assert "combined" in capsys.readouterr().out
    first = load_dir(out)
    assert cli_main(args + ["--alpha", "-1"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err
    assert_bitwise_equal(load_dir(out), first)
    assert cli_main(args + ["--alpha", "-1", "--force", "--exclude", "embed"]) == 0
    want = reference(t["target"], t["rl"], t["sft"], -1.0) | {
        "embed.weight": t["target"]["embed.weight"]}
    assert_bitwise_equal(load_dir(out), want)
    assert not work_dirs(out)
    assert cli_main(args + ["--force", "--max-shard-size", "lots"]) == 2
    assert "not a positive size" in capsys.readouterr().err


def test_cli_refuses_a_partial_merge_unless_allowed(tmp_path, capsys):
    """A vector that reaches only part of the target (most tensors differ in shape) is an
    error, exit 2 and one line, unless --allow-partial."""
    target = random_tensors(3)
    rl, sft = random_tensors(1), random_tensors(2)
    for name in ("embed.weight", "layers.0.proj.weight", "layers.1.proj.weight"):
        rl[name] = torch.randn(*(d + 1 for d in rl[name].shape))
        sft[name] = torch.randn(*rl[name].shape)
    dirs = [write_checkpoint(tmp_path / n, t) for n, t in zip(("rl", "sft", "t"), (rl, sft, target))]
    args = ["merge", "--rl", str(dirs[0]), "--sft", str(dirs[1]), "--target", str(dirs[2]),
            "--out", str(tmp_path / "out"), "--quiet"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 of 6 tensors" in err[0] and "--allow-partial" in err[0]
    assert not (tmp_path / "out").exists()
    assert cli_main(args + ["--allow-partial"]) == 0
    assert "shape mismatch" in capsys.readouterr().out


# ------------------------------------------------------------------------ crash safety

KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from attnrl.merge import merge_checkpoints

    rl, sft, target, out, marker, force = sys.argv[1:7]

    def slow(name, index):
        with open(marker, "a") as handle:
            handle.write(name + "\\n")
        time.sleep(0.3)

    merge_checkpoints(rl, sft, target, out, alpha=2.0, force=force == "1", max_shard_bytes=4000,
                      progress=False, on_tensor=slow)
""")


def _merge_and_kill(root: Path, out: Path, force: bool) -> None:
    """Run a merge in a subprocess and SIGKILL it after it has written 2 tensors."""
    marker = out.parent / f"{out.name}.marker"
    marker.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(root / "rl_sharded"),
                             str(root / "sft"), str(root / "target"), str(out), str(marker),
                             "1" if force else "0"], env=env, cwd=REPO)
    deadline = time.monotonic() + 120
    while not (marker.exists() and len(marker.read_text().split()) >= 2):
        assert proc.poll() is None, "merge ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def test_kill_mid_merge_leaves_no_out_and_next_run_cleans_up(tmp_path, toy):
    root, t = toy
    out = tmp_path / "out"
    _merge_and_kill(root, out, force=False)
    assert not out.exists()
    leftovers = work_dirs(out)
    assert len(leftovers) == 1 and list(leftovers[0].glob("*.safetensors"))  # partial shards
    merge_checkpoints(root / "rl", root / "sft", root / "target", out, alpha=2.0, progress=False)
    assert not work_dirs(out)
    assert_bitwise_equal(load_dir(out), reference(t["target"], t["rl"], t["sft"], 2.0))


def test_kill_during_forced_merge_keeps_the_old_out(tmp_path, toy):
    root, _ = toy
    out = tmp_path / "out"
    merge_checkpoints(root / "rl", root / "sft", root / "target", out, alpha=0.5, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _merge_and_kill(root, out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(UserError, match="already exists"):
        merge_checkpoints(root / "rl", root / "sft", root / "target", out, progress=False)
    assert not work_dirs(out)  # the dead run's temp dir was removed


# ------------------------------------------------------------------------ SmolLM2

@pytest.mark.slow
def test_smollm2_merge_loads_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attnrl.models import resolve_model

    sft = resolve_model("smollm2")
    sft_t = load_dir(sft)
    gen = torch.Generator().manual_seed(0)
    rl_t = {k: v + 1e-3 * v.std() * torch.randn(v.shape, generator=gen) for k, v in sft_t.items()}
    rl = tmp_path / "rl"
    shutil.copytree(sft, rl, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(rl_t, rl / "model.safetensors", metadata={"format": "pt"})
    del rl_t
    out = tmp_path / "merged"
    summary = merge_checkpoints(rl, sft, sft, out, alpha=0.5, max_shard_bytes="200MB",
                                progress=False)
    assert summary.shards >= 3 and len(summary.combined) == len(sft_t)
    got, rl_t = load_dir(out), load_dir(rl)
    for name in ("model.embed_tokens.weight", "model.layers.7.mlp.down_proj.weight"):
        assert torch.equal(got[name], sft_t[name] + 0.5 * (rl_t[name] - sft_t[name]))
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    text = tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert generated.shape[1] > prompt["input_ids"].shape[1] and text.strip()
