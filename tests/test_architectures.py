"""Issue 26: every architecture mergekit 0.1.5 defines and transformers builds, from
transformers' own model classes (tiny configs): `check` passes and a LoX merge matches
float64 tensor by tensor and loads and runs, or `check` refuses naming the tensor.

Fixed here (mergekit_compat.install_checkpoint_fit): GPT-NeoX (attention bias buffers
no longer saved), Cohere without qk-norm, Falcon-7B layout (the other layout's norms),
Falcon-40B with a tied head. docs/architectures.md has the table.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import reference as ref
import torch
import yaml
from conftest import run_cli
from safetensors.torch import load_file, save_file

from mergekit_lox.demo.synthetic import load_state_dict

SMALL = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
GPT_STYLE = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)
ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "llama-tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "gemma": ("GemmaConfig", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", {"head_dim": 8}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 8}),
    "phi3": ("Phi3Config", {}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3-moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16}),
    "olmo2": ("Olmo2Config", {}),
    "starcoder2": ("Starcoder2Config", {}),
    "stablelm": ("StableLmConfig", {}),
    "granite": ("GraniteConfig", {}),
    "cohere": ("CohereConfig", {"use_qk_norm": False}),
    "cohere-qk-norm": ("CohereConfig", {"use_qk_norm": True}),
    "gpt-neox": ("GPTNeoXConfig", {}),
    "gpt2": ("GPT2Config", GPT_STYLE),
    "gpt-bigcode": ("GPTBigCodeConfig", GPT_STYLE),
    "falcon-7b": ("FalconConfig", {"new_decoder_architecture": False, "multi_query": True, "parallel_attn": True}),
    "falcon-40b-tied": ("FalconConfig", {"new_decoder_architecture": True, "num_kv_heads": 2}),
}
ALPHA, RANK = 1.25, 2


def build(name: str, root) -> dict:
    """base (random, seed 0) and aligned = base + a planted rank-4 delta on every matrix."""
    import transformers
    from transformers import AutoModelForCausalLM

    cls, extra = ARCHITECTURES[name]
    config = getattr(transformers, cls)(**{**SMALL, **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    paths = {"base": str(root / "base"), "aligned": str(root / "aligned")}
    model.save_pretrained(paths["base"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim >= 2:
                *stack, m, n = parameter.shape
                u, v = torch.randn(*stack, m, 4, generator=g), torch.randn(*stack, 4, n, generator=g)
                parameter.add_(0.05 * (u @ v) / 4)
    model.save_pretrained(paths["aligned"])
    paths["finetuned"] = str(root / "finetuned")
    with torch.no_grad():  # a fine-tuning update of its own, also rank 4 per matrix
        for parameter in model.parameters():
            if parameter.ndim >= 2:
                *stack, m, n = parameter.shape
                u, v = torch.randn(*stack, m, 4, generator=g), torch.randn(*stack, 4, n, generator=g)
                parameter.add_(0.05 * (u @ v) / 4)
    model.save_pretrained(paths["finetuned"])
    return paths


def lox_expected(aligned: torch.Tensor, base: torch.Tensor) -> np.ndarray:
    """LoX in float64, matrix by matrix for a stack; 1-D tensors pass through."""
    A, B = ref.f64(aligned), ref.f64(base)
    if A.ndim < 2:
        return A
    flat_a, flat_b = A.reshape(-1, *A.shape[-2:]), B.reshape(-1, *B.shape[-2:])
    return np.stack([ref.lox(a, b, ALPHA, RANK) for a, b in zip(flat_a, flat_b, strict=True)]).reshape(A.shape)


def recipe(paths: dict, root) -> str:
    document = {
        "merge_method": "lox_extrapolate",
        "base_model": paths["base"],
        "models": [{"model": paths["aligned"]}],
        "parameters": {"alpha": ALPHA, "rank": RANK, "svd": "exact"},
        "dtype": "float32",
    }
    path = root / "lox.yml"
    path.write_text(yaml.safe_dump(document))
    return str(path)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_lox_runs_and_matches_float64_on_every_architecture(name, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    paths = build(name, tmp_path)
    source = recipe(paths, tmp_path)
    code, out, err = run_cli(["check", source], capsys)
    assert code == 0 and "error" not in err, err
    code, _, err = run_cli(["run", source, str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 0, err
    merged = load_state_dict(str(tmp_path / "out"))
    # The layout mergekit decomposes is the one transformers loads (per-expert checkpoints of
    # Mixtral and Qwen3-MoE become fused gate_up_proj / down_proj stacks): compare on it.
    base, aligned = (
        {**load_state_dict(paths[k]), **AutoModelForCausalLM.from_pretrained(paths[k]).state_dict()}
        for k in ("base", "aligned")
    )
    assert set(merged) <= set(aligned)  # whole: the loading check below finds nothing missing
    worst = max(ref.rel_err(ref.f64(merged[n]), lox_expected(aligned[n], base[n])) for n in merged)
    assert worst < 1e-5, worst
    assert any(ref.rel_err(ref.f64(merged[n]), ref.f64(aligned[n])) > 1e-3 for n in merged)  # it did extrapolate
    model, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info  # nothing re-initialised
    logits = model(torch.tensor([[1, 5, 7, 9]])).logits
    assert logits.shape == (1, 4, 128) and torch.isfinite(logits).all()


def test_a_tensor_the_model_needs_and_an_input_lacks_is_refused_before_computing(tmp_path, capsys):
    paths = build("llama", tmp_path)
    shard = os.path.join(paths["aligned"], "model.safetensors")
    tensors = load_file(shard)
    missing = "model.layers.1.mlp.down_proj.weight"
    del tensors[missing]
    save_file(tensors, shard, metadata={"format": "pt"})
    source = recipe(paths, tmp_path)
    for command in (["check", source], ["run", source, str(tmp_path / "out"), "--quiet"]):
        code, _, err = run_cli(command, capsys)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 1 and len(errors) == 1, err
        assert f"tensor {missing}, which mergekit's definition of this architecture requires" in errors[0]
        assert paths["aligned"] in errors[0] and "RuntimeError" not in err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("name", ["gpt-neox", "falcon-40b-tied"])
def test_check_says_which_definition_tensors_are_left_out(name, tmp_path, capsys):
    paths = build(name, tmp_path)
    code, out, _ = run_cli(["check", recipe(paths, tmp_path)], capsys)
    assert code == 0 and "which the checkpoints do not store and the model does not use" in out


REALIGN = ["gpt-neox", "falcon-7b", "falcon-40b-tied", "cohere", "mixtral", "qwen3-moe", "gpt2", "gemma2"]


@pytest.mark.parametrize("name", REALIGN)
def test_lssf_and_safelora_run_and_match_float64(name, tmp_path, capsys):
    """The realignment methods on the fixed and the MoE architectures (rank and threshold away
    from any boundary: LSSF rank 4, the planted rank; Safe LoRA threshold 2, every tensor)."""
    from transformers import AutoModelForCausalLM

    paths = build(name, tmp_path)
    states = {
        k: {**load_state_dict(paths[k]), **AutoModelForCausalLM.from_pretrained(paths[k]).state_dict()}
        for k in ("base", "aligned", "finetuned")
    }
    for method, parameters, expected in (
        ("lssf_fusion", {"rank": 4, "svd": "exact"}, lambda f, a, b: ref.lssf(f, a, b, rank=4)),
        ("safelora_project", {"threshold": 2.0}, lambda f, a, b: ref.safelora(f, a, b, threshold=2.0)),
    ):
        document = {
            "merge_method": method,
            "base_model": paths["base"],
            "models": [
                {"model": paths["aligned"], "parameters": {"role": "aligned"}},
                {"model": paths["finetuned"], "parameters": {"role": "finetuned"}},
            ],
            "parameters": parameters,
            "dtype": "float32",
        }
        source = tmp_path / f"{method}.yml"
        source.write_text(yaml.safe_dump(document))
        out = tmp_path / method
        code, _, err = run_cli(["run", str(source), str(out), "--quiet"], capsys)
        assert code == 0, err
        merged = load_state_dict(str(out))
        b, a, f = states["base"], states["aligned"], states["finetuned"]
        worst = max(
            ref.rel_err(ref.f64(merged[n]), expected(ref.f64(f[n]), ref.f64(a[n]), ref.f64(b[n]))) for n in merged
        )
        assert worst < 1e-5, (method, worst)
