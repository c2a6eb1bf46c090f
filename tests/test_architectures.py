"""Issue 26: every architecture mergekit 0.1.5 defines (JSON definitions, moe_defs, and
models it infers) that transformers 5 builds, from transformers' own model classes (tiny
configs): `check` passes and a LoX merge matches float64 tensor by tensor and loads and
runs, or `check` refuses in one line before computing.

Fitted here (mergekit_compat.checkpoint_fit, in the key space of the transformers model):
GPT-NeoX (attention bias buffers no longer saved), Cohere without qk-norm, Falcon-7B
layout (the other layout's norms), Falcon-40B with a tied head, t5-small's ungated
feed-forward, Whisper's decoder prefix, Qwen2-VL's layer count, Gemma 3's vision tower
and the bare DistilBERT / RoBERTa encoders saved under other names, Qwen3-VL's deepstack
mergers, BertModel's optional aliased buffer, DeepSeek-V3's and Jamba's expert stacks
(inferred optional, held only through conversion). docs/architectures.md has the table.
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
ENCODER = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    num_labels=3,
)
DISTILBERT = dict(
    vocab_size=128, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64, num_labels=3
)
ROBERTA = dict(ENCODER, max_position_embeddings=66, pad_token_id=1)
VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
QWEN_VISION = dict(
    depth=2,
    hidden_size=32,
    out_hidden_size=32,
    intermediate_size=64,
    num_heads=4,
    patch_size=4,
    spatial_merge_size=2,
    temporal_patch_size=2,
)
QWEN3_VISION = dict(QWEN_VISION, num_position_embeddings=16, deepstack_visual_indexes=[1])
MROPE = {"rope_type": "default", "mrope_section": [1, 1, 2]}
T5 = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)


def causal(config: str, **extra):
    """A causal LM (built and loaded with AutoModelForCausalLM) of the SMALL size."""
    return (None, config, {**SMALL, **extra})


def own(model: str, config: str, **kwargs):
    """Built and loaded with transformers' class ``model`` (encoders, heads, multimodal)."""
    return (model, config, kwargs)


ARCHITECTURES = {
    # the 23 variants
    "llama": causal("LlamaConfig"),
    "llama-tied": causal("LlamaConfig", tie_word_embeddings=True),
    "mistral": causal("MistralConfig"),
    "qwen2": causal("Qwen2Config"),
    "qwen3": causal("Qwen3Config", head_dim=8),
    "gemma": causal("GemmaConfig", head_dim=8),
    "gemma2": causal("Gemma2Config", head_dim=8),
    "gemma3": causal("Gemma3TextConfig", head_dim=8),
    "phi3": causal("Phi3Config"),
    "mixtral": causal("MixtralConfig", num_local_experts=4, num_experts_per_tok=2),
    "qwen2-moe": causal(
        "Qwen2MoeConfig",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
    ),
    "qwen3-moe": causal("Qwen3MoeConfig", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "olmo": causal("OlmoConfig"),
    "olmo2": causal("Olmo2Config"),
    "starcoder2": causal("Starcoder2Config"),
    "stablelm": causal("StableLmConfig"),
    "cohere": causal("CohereConfig", use_qk_norm=False),
    "cohere-qk-norm": causal("CohereConfig", use_qk_norm=True),
    "gpt-neox": causal("GPTNeoXConfig"),
    "gpt2": causal("GPT2Config", **GPT_STYLE),
    "falcon-7b": causal("FalconConfig", new_decoder_architecture=False, multi_query=True, parallel_attn=True),
    "falcon-40b": causal("FalconConfig", new_decoder_architecture=True, num_kv_heads=2, tie_word_embeddings=False),
    "falcon-40b-tied": causal("FalconConfig", new_decoder_architecture=True, num_kv_heads=2),
    # further causal LMs mergekit 0.1.5 has a definition for (JSON or moe_defs)
    "granite": causal("GraniteConfig"),
    "gpt-bigcode": causal("GPTBigCodeConfig", **GPT_STYLE),
    "apertus": causal("ApertusConfig", head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
    "arcee": causal("ArceeConfig"),
    "cohere2": causal("Cohere2Config", sliding_window=16),
    "glm4": causal("Glm4Config", head_dim=8),
    "glm4-moe": causal(
        "Glm4MoeConfig",
        head_dim=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
    ),
    "afmoe": causal(
        "AfmoeConfig",
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        num_dense_layers=1,
        num_shared_experts=1,
    ),
    "granite-moe-hybrid": causal(
        "GraniteMoeHybridConfig",
        layer_types=["mamba", "attention"],
        num_local_experts=4,
        num_experts_per_tok=2,
        shared_intermediate_size=32,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=8,
        mamba_n_groups=1,
        mamba_expand=2,
    ),
    "lfm2": causal(
        "Lfm2Config", layer_types=["conv", "full_attention"], block_ff_dim=64, block_auto_adjust_ff_dim=False
    ),
    "mamba": own("MambaForCausalLM", "MambaConfig", **{**SMALL, "state_size": 8, "expand": 2, "conv_kernel": 4}),
    "phi": causal("PhiConfig"),
    # ones mergekit infers (its exaone.json is the remote-code EXAONE 3); DeepSeek-V3 and Jamba
    # have MoE and dense layers, so mergekit infers the expert stacks as optional
    "exaone4": causal("Exaone4Config", head_dim=8),
    "deepseek-v3": causal(
        "DeepseekV3Config",
        num_key_value_heads=4,  # multi-head latent attention: as many as the query heads
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    ),
    "jamba": causal(
        "JambaConfig",
        num_experts=2,
        num_experts_per_tok=1,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=8,
        mamba_dt_rank=4,
        use_mamba_kernels=False,
    ),
    # sequence classification heads
    "llama-seq-cls": own("LlamaForSequenceClassification", "LlamaConfig", **SMALL, num_labels=3),
    "gpt2-seq-cls": own("GPT2ForSequenceClassification", "GPT2Config", vocab_size=128, **GPT_STYLE, num_labels=3),
    # encoders and encoder-decoders
    **{
        f"bert-{head}": own(f"Bert{head}", "BertConfig", **ENCODER)
        for head in ("Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForMultipleChoice")
    },
    **{
        f"{family.lower()}-{head}": own(f"{family}{head}", f"{family}Config", **kwargs)
        for family, kwargs in (("DistilBert", DISTILBERT), ("Roberta", ROBERTA))
        for head in ("Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification")
    },
    "t5": own("T5ForConditionalGeneration", "T5Config", **T5),
    "t5-gated": own(
        "T5ForConditionalGeneration", "T5Config", **T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False
    ),
    "whisper": own(
        "WhisperForConditionalGeneration",
        "WhisperConfig",
        vocab_size=128,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=16,
        max_source_positions=32,
        max_target_positions=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    ),
    # multimodal (vision tower, projector and language model all merged)
    "gemma3-vl": own(
        "Gemma3ForConditionalGeneration",
        "Gemma3Config",
        text_config=dict(SMALL, head_dim=8),
        vision_config=VISION,
        mm_tokens_per_image=4,
        image_token_index=100,
        boi_token_index=101,
        eoi_token_index=102,
    ),
    "mistral3": own(
        "Mistral3ForConditionalGeneration",
        "Mistral3Config",
        text_config=dict(SMALL, head_dim=8, model_type="mistral"),
        vision_config=dict(VISION, head_dim=8, model_type="pixtral"),
        image_token_index=100,
    ),
    "llama4": own(
        "Llama4ForConditionalGeneration",
        "Llama4Config",
        text_config=dict(SMALL, head_dim=8, intermediate_size_mlp=64, num_local_experts=2, num_experts_per_tok=1),
        vision_config=dict(VISION, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32),
        image_token_index=100,
    ),
    "qwen2-vl": own(
        "Qwen2VLForConditionalGeneration",
        "Qwen2VLConfig",
        text_config=dict(SMALL, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4),
    ),
    "qwen2.5-vl": own(
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLConfig",
        text_config=dict(SMALL, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(QWEN_VISION, fullatt_block_indexes=[1]),
    ),
    "qwen3-vl": own(
        "Qwen3VLForConditionalGeneration",
        "Qwen3VLConfig",
        text_config=dict(SMALL, head_dim=8, rope_scaling=dict(MROPE, mrope_interleaved=True)),
        vision_config=QWEN3_VISION,
    ),
    "qwen3-vl-moe": own(
        "Qwen3VLMoeForConditionalGeneration",
        "Qwen3VLMoeConfig",
        text_config=dict(
            SMALL,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            rope_scaling=dict(MROPE, mrope_interleaved=True),
        ),
        vision_config=QWEN3_VISION,
    ),
}
ALPHA, RANK = 1.25, 2


def model_class(name: str):
    import transformers

    model = ARCHITECTURES[name][0]
    return getattr(transformers, model) if model else transformers.AutoModelForCausalLM


def build(name: str, root) -> dict:
    """base (random, seed 0) and aligned = base + a planted rank-4 delta on every matrix
    (every matrix of a stack), finetuned = aligned + another."""
    import transformers

    model_name, config_name, kwargs = ARCHITECTURES[name]
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(0)
    model = model_class(name)(config) if model_name else model_class(name).from_config(config)
    paths = {k: str(root / k) for k in ("base", "aligned", "finetuned")}
    model.save_pretrained(paths["base"])
    g = torch.Generator().manual_seed(1)
    plant_rank_4_delta(model, g)
    model.save_pretrained(paths["aligned"])
    plant_rank_4_delta(model, g)  # a fine-tuning update of its own
    model.save_pretrained(paths["finetuned"])
    return paths


def plant_rank_4_delta(model, g: torch.Generator) -> None:
    """Adds 0.05 u v / 4 (u, v Gaussian, rank 4) to every matrix, every matrix of a stack."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim >= 2:
                *stack, m, n = parameter.shape
                u, v = torch.randn(*stack, m, 4, generator=g), torch.randn(*stack, 4, n, generator=g)
                parameter.add_(0.05 * (u @ v) / 4)


def loaded_state(name: str, path: str) -> dict:
    """The checkpoint's tensors and, over them, the layout transformers loads (per-expert
    checkpoints of Mixtral and Qwen-MoE become fused gate_up_proj / down_proj stacks): the
    layout mergekit decomposes, so the one to compare on."""
    return {**load_state_dict(path), **model_class(name).from_pretrained(path).state_dict()}


def example_inputs(name: str, config) -> dict:
    ids = torch.tensor([[1, 5, 7, 9]])
    model = ARCHITECTURES[name][0] or ""
    if model.endswith("ForMultipleChoice"):
        return {"input_ids": ids.unsqueeze(1).expand(1, 2, 4)}
    if model.startswith("T5"):
        return {"input_ids": ids, "decoder_input_ids": ids}
    if model.startswith("Whisper"):
        features = torch.randn(1, config.num_mel_bins, 2 * config.max_source_positions)
        return {"input_features": features, "decoder_input_ids": ids}
    return {"input_ids": ids}


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
    paths = build(name, tmp_path)
    source = recipe(paths, tmp_path)
    code, out, err = run_cli(["check", source], capsys)
    assert code == 0 and not [line for line in err.splitlines() if line.startswith("error:")], err
    code, _, err = run_cli(["run", source, str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 0, err
    merged = load_state_dict(str(tmp_path / "out"))
    base, aligned = (loaded_state(name, paths[k]) for k in ("base", "aligned"))
    assert set(merged) <= set(aligned)  # whole: the loading check below finds nothing missing
    worst = max(ref.rel_err(ref.f64(merged[n]), lox_expected(aligned[n], base[n])) for n in merged)
    assert worst < 1e-5, worst
    assert any(ref.rel_err(ref.f64(merged[n]), ref.f64(aligned[n])) > 1e-3 for n in merged)  # it did extrapolate
    model, info = model_class(name).from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info  # nothing re-initialised
    with torch.no_grad():
        output = model(**example_inputs(name, model.config))[0]
    assert output.shape[0] == 1 and torch.isfinite(output).all()
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        assert output.shape[-1] == 128  # a language-model head: logits over the vocabulary


def refused(command, capsys) -> str:
    """The one error line of a refused command (exit 1, no traceback)."""
    code, _, err = run_cli(command, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1, err
    assert "RuntimeError" not in err and "Traceback" not in err, err
    return errors[0]


def test_a_tensor_the_model_needs_and_an_input_lacks_is_refused_before_computing(tmp_path, capsys):
    paths = build("llama", tmp_path)
    shard = os.path.join(paths["aligned"], "model.safetensors")
    tensors = load_file(shard)
    missing = "model.layers.1.mlp.down_proj.weight"
    del tensors[missing]
    save_file(tensors, shard, metadata={"format": "pt"})
    source = recipe(paths, tmp_path)
    for command in (["check", source], ["run", source, str(tmp_path / "out"), "--quiet"]):
        error = refused(command, capsys)
        assert f"tensor {missing}, which mergekit's definition of this architecture requires" in error
        assert paths["aligned"] in error
    assert not os.path.exists(tmp_path / "out")
    # A hub model is not fetched by check: the fit at the start of every merge (plain
    # mergekit-yaml too) says the same, before any tensor is computed.
    import mergekit.architecture
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_lox.mergekit_compat import DefinitionError, install_checkpoint_fit

    assert install_checkpoint_fit()
    config = MergeConfiguration.model_validate(yaml.safe_load(open(source)))
    with pytest.raises(DefinitionError, match=f"tensor {missing}, which mergekit's definition"):
        mergekit.architecture.get_architecture_info(config, MergeOptions())


def test_a_definition_that_does_not_fit_the_config_is_refused_before_computing(tmp_path, capsys, monkeypatch):
    """No definition mergekit 0.1.5 ships fails this way once repaired (Qwen2-VL's layer count
    was one: mergekit printed its whole config in a RuntimeError); a definition slip the fit
    cannot repair, stood in for here by a layer-count key the config lacks, is one line."""
    from mergekit.architecture.json_definitions import JsonModuleArchitecture

    paths = build("llama", tmp_path)
    source = recipe(paths, tmp_path)
    monkeypatch.setattr(JsonModuleArchitecture, "num_layers_config_key", lambda self: "decoder_layers")
    for command in (["check", source], ["run", source, str(tmp_path / "out"), "--quiet"]):
        error = refused(command, capsys)
        assert "mergekit's definition of LlamaForCausalLM does not fit the config of /" in error
        assert paths["base"] in error or paths["aligned"] in error
        assert "has no attribute decoder_layers" in error and "not supported" in error
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(
    "name, note",
    [
        ("gpt-neox", "which the checkpoints do not store and the model does not use"),
        ("falcon-40b-tied", "which the checkpoints do not store and the model does not use"),
        ("t5", "the checkpoints store decoder.block.0.layer.2.DenseReluDense.wi.weight,"),
        ("distilbert-Model", "distilbert.embeddings.position_embeddings.weight (stored as embeddings.position_emb"),
        ("gemma3-vl", "vision_tower.vision_model.embeddings.patch_embedding.bias (stored as vision_tower.embed"),
        ("whisper", "module decoder's weight prefix 'model.decoder' read as 'model.decoder.'"),
        ("qwen2-vl", "module text_decoder's layer count read from text_config.num_hidden_layers"),
    ],
)
def test_check_says_how_the_definition_is_fitted(name, note, tmp_path, capsys):
    paths = build(name, tmp_path)
    code, out, _ = run_cli(["check", recipe(paths, tmp_path)], capsys)
    assert code == 0 and note in out, out


def linear(name, tensor, conv1d):
    """The matrix the methods decompose: a Conv1D weight (in ``conv1d``) transposed to [out, in]."""
    return tensor.T if name in conv1d else tensor


def conv1d_weights(model) -> set:
    """Weight names of the model's transformers Conv1D modules (stored [in, out])."""
    from transformers.pytorch_utils import Conv1D

    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}


REALIGN = ["gpt-neox", "falcon-7b", "falcon-40b-tied", "cohere", "mixtral", "qwen3-moe", "gpt2", "gemma2"]
REALIGN += ["t5", "whisper", "gemma3-vl", "distilbert-Model"]


@pytest.mark.parametrize("name", REALIGN)
def test_lssf_and_safelora_run_and_match_float64(name, tmp_path, capsys):
    """The realignment methods on the fitted and the MoE architectures (rank and threshold
    away from any boundary: LSSF rank 4, the planted rank; Safe LoRA threshold 2, every tensor)."""
    paths = build(name, tmp_path)
    states = {k: loaded_state(name, paths[k]) for k in ("base", "aligned", "finetuned")}
    # GPT-2's Conv1D stores W [in, out]: the methods act on the layer's output space, as on
    # an nn.Linear's W [out, in], so the float64 formulas are taken on the transpose.
    conv1d = conv1d_weights(model_class(name).from_pretrained(paths["base"]))
    assert bool(conv1d) == (name == "gpt2")

    def linear_map(n, f, a, b, formula):
        return linear(n, formula(*(linear(n, t, conv1d) for t in (f, a, b))), conv1d)

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
        _, info = model_class(name).from_pretrained(str(out), output_loading_info=True)
        assert not info["missing_keys"], (method, info)  # whole (a vision tower left out would show here)
        b, a, f = states["base"], states["aligned"], states["finetuned"]
        worst = max(
            ref.rel_err(ref.f64(merged[n]), linear_map(n, ref.f64(f[n]), ref.f64(a[n]), ref.f64(b[n]), expected))
            for n in merged
        )
        assert worst < 1e-5, (method, worst)


def test_tensors_added_to_a_definition_follow_their_layer_in_a_slices_recipe(tmp_path, capsys):
    """Falcon-7B's input_layernorm, which mergekit's definition does not list, is added per
    layer: a recipe that takes layer 1 alone writes layer 1's norm as layer 0's."""
    from transformers import AutoModelForCausalLM

    paths = build("falcon-7b", tmp_path)
    document = {
        "merge_method": "lox_extrapolate",
        "base_model": paths["base"],
        "slices": [{"sources": [{"model": paths[k], "layer_range": [1, 2]} for k in ("aligned", "base")]}],
        "parameters": {"alpha": ALPHA, "rank": RANK, "svd": "exact"},
        "dtype": "float32",
    }
    source = tmp_path / "slice.yml"
    source.write_text(yaml.safe_dump(document))
    code, _, err = run_cli(["run", str(source), str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 0, err
    merged = load_state_dict(str(tmp_path / "out"))
    base, aligned = load_state_dict(paths["base"]), load_state_dict(paths["aligned"])
    assert not any(name.startswith("transformer.h.1.") for name in merged)
    for name in ("input_layernorm.weight", "input_layernorm.bias", "self_attention.dense.weight"):
        expected = lox_expected(aligned[f"transformer.h.1.{name}"], base[f"transformer.h.1.{name}"])
        assert ref.rel_err(ref.f64(merged[f"transformer.h.0.{name}"]), expected) < 1e-5, name
    _, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


@pytest.mark.parametrize("name", ["gpt-neox", "distilbert-Model", "falcon-7b"])
def test_a_slices_recipe_that_stacks_layers_takes_the_fitted_tensors_with_them(name, tmp_path, capsys):
    """Layers 0-1 of aligned then 0-1 of base (passthrough): the fit's skipped (GPT-NeoX's
    buffers), renamed (DistilBertModel's unprefixed names) and added (Falcon-7B's norms)
    tensors are fitted in output layers 2 and 3 too, which neither input has."""
    import re

    paths = build(name, tmp_path)
    sources = [{"sources": [{"model": paths[k], "layer_range": [0, 2]}]} for k in ("aligned", "base")]
    source = tmp_path / "stack.yml"
    source.write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": sources, "dtype": "float32"}))
    code, _, err = run_cli(["run", str(source), str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 0, err
    merged = load_state_dict(str(tmp_path / "out"))
    inputs = {k: load_state_dict(paths[k]) for k in ("base", "aligned")}
    layers = {int(found.group(1)) for found in map(re.compile(r"\.(\d+)\.").search, merged) if found}
    assert layers == {0, 1, 2, 3}
    for tensor_name, tensor in merged.items():
        found = re.search(r"\.(\d+)\.", tensor_name)
        if found:
            index, model = int(found.group(1)) % 2, ("aligned", "base")[int(found.group(1)) // 2]
            source_name = tensor_name[: found.start()] + f".{index}." + tensor_name[found.end() :]
            assert torch.equal(tensor, inputs[model][source_name]), tensor_name
    model, info = model_class(name).from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert model.config.num_hidden_layers == 4
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_inputs_saved_by_different_transformers_versions_merge_under_one_name(tmp_path, capsys):
    """Gemma 3's vision tower: the aligned model as transformers 4 saved it
    (vision_tower.vision_model.*, mergekit's names), the base as transformers 5 saves it
    (vision_tower.*). The merge reads each under its own name; the output, under
    mergekit's names, loads whole and matches LoX on the tensors transformers loads."""
    paths = build("gemma3-vl", tmp_path)
    shard = os.path.join(paths["aligned"], "model.safetensors")
    tensors = {
        name.replace("vision_tower.", "vision_tower.vision_model.", 1): tensor
        for name, tensor in load_file(shard).items()
    }
    save_file(tensors, shard, metadata={"format": "pt"})
    source = recipe(paths, tmp_path)
    code, out, err = run_cli(["check", source], capsys)
    assert (
        code == 0 and "vision_tower.vision_model.embeddings.patch_embedding.bias (also stored as vision_tower." in out
    )
    code, _, err = run_cli(["run", source, str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 0, err
    cls = model_class("gemma3-vl")
    base, aligned = (cls.from_pretrained(paths[k]).state_dict() for k in ("base", "aligned"))
    model, info = cls.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    merged = model.state_dict()
    assert any(".vision_tower." in n for n in merged)
    worst = max(ref.rel_err(ref.f64(merged[n]), lox_expected(aligned[n], base[n])) for n in merged)
    assert worst < 1e-5, worst
