"""PEFT LoRA as a job option (`lora: {r, lora_alpha}`): only adapters train, the frozen base
stays bit-identical, and the rollout engine receives W + (alpha / r) * B @ A."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainers.cli import run_job
from trainers.job import load_config, parse_overrides

TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
R, ALPHA = 8, 16


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """Two optimizer steps of the tiny job with LoRA given as a command-line override."""
    out = tmp_path_factory.mktemp("lora_run")
    overrides = parse_overrides(["--model", str(tiny_model_dir), "--output_dir", str(out),
                                 "--lora", f"{{r: {R}, lora_alpha: {ALPHA}}}"])
    config = load_config(TINY_CONFIG, overrides)
    assert config["lora"] == {"r": R, "lora_alpha": ALPHA}
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    initial_adapters = {}

    from transformers import TrainerCallback

    class RecordAdapters(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            initial_adapters.update({n: p.detach().clone() for n, p in model.named_parameters()
                                     if "lora_" in n})

    trainer = run_job(config, callbacks=[RecordAdapters()])
    return trainer, base, initial_adapters


def lora_modules(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{HF weight name of each adapted linear: (A (r, in), B (out, r))}."""
    params = dict(model.named_parameters())
    found = {}
    for name, lora_a in params.items():
        if name.endswith("lora_A.default.weight"):
            prefix = name[:-len("lora_A.default.weight")]
            lora_b = params[prefix + "lora_B.default.weight"]
            found[prefix.replace("base_model.model.", "", 1) + "weight"] = (lora_a.detach(),
                                                                            lora_b.detach())
    return found


def test_only_adapters_train(lora_run):
    trainer, base, initial_adapters = lora_run
    model = trainer.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable), trainable
    assert trainable == set(initial_adapters)
    # every linear layer of every block is adapted ('all-linear'), lm_head is not
    adapted = lora_modules(model)
    layers = model.config.num_hidden_layers
    assert len(adapted) == 7 * layers and "lm_head.weight" not in adapted
    # the frozen base is bit-identical to the saved model after two steps and the syncs
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        hf_name = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        assert torch.equal(param.detach(), base[hf_name]), f"frozen {hf_name} changed"
    # every adapter moved (B starts at zero, so A only moves from the second step on)
    unchanged = [n for n, p in model.named_parameters()
                 if p.requires_grad and torch.equal(p.detach(), initial_adapters[n])]
    assert not unchanged, f"adapters unchanged after two steps: {unchanged}"


def test_engine_receives_merged_weights(lora_run):
    trainer, base, _ = lora_run
    trainer.sync_engine_weights()
    engine_state = trainer.engine.model.state_dict()
    adapted = lora_modules(trainer.model)
    assert set(engine_state) == set(base)
    scale = ALPHA / R
    for name, weight in base.items():
        if name in adapted:
            lora_a, lora_b = adapted[name]
            expected = weight + scale * (lora_b @ lora_a)
            assert not torch.allclose(expected, weight, atol=1e-6), f"{name}: zero update"
        else:
            expected = weight
        # tolerance: one float32 rounding of the sum on values of order 0.1
        torch.testing.assert_close(engine_state[name], expected, rtol=0, atol=1e-6,
                                   msg=f"engine weight {name} is not base + B @ A * scale")


def test_saved_final_model_is_the_adapter(lora_run):
    trainer, _, _ = lora_run
    final = Path(trainer.args.output_dir) / "final"
    assert (final / "adapter_config.json").is_file()
    saved = load_file(final / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)


def test_final_adapter_loads_over_its_base_everywhere(lora_run, tmp_path, monkeypatch,
                                                     capsys):
    """A LoRA run's final/ (an adapter) is a model directory for every command: resolved
    once into the merged model (base + (alpha / r) B A, the weights the engine trained
    against), named with its base on stderr, reused from the cache the next time; `attnrl
    generate` samples it and a broken adapter is refused in one line before any load."""
    from attnrl.cli import main
    from attnrl.errors import UserError
    from attnrl.models import load_model, resolve_model
    from trainers.lora_merge import merged_lora_state_dict

    monkeypatch.setenv("ATTNRL_CACHE", str(tmp_path / "cache"))
    trainer, base, _ = lora_run
    final = Path(trainer.args.output_dir) / "final"
    merged_dir = resolve_model(final)
    assert "over" in capsys.readouterr().err
    assert resolve_model(final) == merged_dir and "merged:" in capsys.readouterr().err
    loaded = load_model(final).state_dict()
    expected = merged_lora_state_dict(trainer.accelerator.unwrap_model(trainer.model))
    assert loaded.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(loaded[name], value.float(), rtol=0, atol=0, msg=name)
    assert any(not torch.equal(loaded[n], base[n]) for n in base), "merged = base"

    code = main(["generate", "--model", str(final), "--engine", "hf", "--num-prompts", "1",
                 "-n", "1", "--max-tokens", "4", "--task", "chain_sum"])
    assert code == 0
    out = capsys.readouterr()
    assert f"model {final}" in out.out  # the plain output names the model it sampled

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"base_model_name_or_path": "/nowhere"}')
    (broken / "adapter_model.safetensors").write_bytes(b"")
    code = main(["generate", "--model", str(broken), "--engine", "hf"])
    err = capsys.readouterr().err
    assert code == 2 and "LoRA adapter over '/nowhere'" in err and len(err.splitlines()) == 1
    with pytest.raises(UserError, match="not a local model directory"):
        resolve_model(broken)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_synced_weights_equal_peft_merge_with_lora_bias(dtype):
    """With lora_bias, PEFT's merge adds (alpha / r) * lora_B.bias to the layer's bias: the
    synced weights are exactly PEFT's merge_and_unload, also for a bf16 base with float32
    adapters (one rounding to bf16, as PEFT's in-place add)."""
    import copy

    from peft import LoraConfig, get_peft_model

    from attnrl.models import build_tiny_model
    from trainers.lora_merge import merged_lora_state_dict

    base = build_tiny_model("qwen2", seed=0, dtype=dtype)  # q/k/v projections have biases
    bias = "model.layers.0.self_attn.q_proj.bias"
    base_bias = base.state_dict()[bias].clone()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_bias=True,
                                            target_modules=["q_proj", "k_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B and its bias start at zero: give every adapter tensor values
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    assert any(n.endswith("lora_B.default.bias") for n, _ in model.named_parameters())
    synced = merged_lora_state_dict(model)
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert synced.keys() == merged.keys()
    for name, value in merged.items():
        assert synced[name].dtype == value.dtype == dtype, name
        assert torch.equal(synced[name], value), name
    assert not torch.equal(synced[bias], base_bias)  # the bias did move


def test_lora_bias_on_a_layer_without_bias_is_refused():
    import warnings

    from peft import LoraConfig, get_peft_model

    from attnrl.errors import UserError
    from attnrl.models import build_tiny_model
    from trainers.lora_merge import merged_lora_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that it cannot merge this either
        model = get_peft_model(build_tiny_model("qwen2"), LoraConfig(
            r=4, lora_alpha=8, lora_bias=True, target_modules=["o_proj"]))
    with pytest.raises(UserError, match=r"lora_bias on .*o_proj, whose layer has no bias"):
        merged_lora_state_dict(model)


def test_lora_on_a_tied_lm_head_is_refused(tmp_path):
    """lm_head tied to the input embedding: vLLM loads only the embedding (the delta would
    be lost), transformers loads the merged lm_head into both (the embedding would move).
    Refused before the model loads (from config.json) and at the first sync."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from attnrl.errors import UserError
    from attnrl.models import build_tiny_model, save_tiny_model
    from trainers.lora_merge import merged_lora_state_dict

    tied = save_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    untied = save_tiny_model(tmp_path / "untied")
    for lora in ("{r: 4, target_modules: [q_proj, lm_head]}", "{r: 4, target_modules: lm_head}",
                 "{r: 4, modules_to_save: [lm_head]}"):
        with pytest.raises(UserError, match="tied to its input embedding.*leave lm_head"):
            load_config(None, parse_overrides(["--model", str(tied), "--lora", lora]))
        assert load_config(None, parse_overrides(["--model", str(untied), "--lora", lora]))
    with pytest.raises(UserError, match="tied to its input embedding"):
        load_config(None, parse_overrides(["--lora", "{r: 4, target_modules: [lm_head]}"]))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(build_tiny_model(tie_word_embeddings=True),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"]))
    with pytest.raises(UserError, match=r"LoRA on .*lm_head, whose weight is tied"):
        merged_lora_state_dict(model)
