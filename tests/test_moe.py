"""Issue 26, MoE: one truth. transformers 5 loads Mixtral's and Qwen3-MoE's per-expert
checkpoints as fused stacks (experts.gate_up_proj [E, 2I, H], experts.down_proj), mergekit
0.1.5's loader converts them the same way, and the merges decompose each expert's fused
gate-and-up matrix. `analyze` and `adapter` must name and measure those same matrices
(held here to float64 SVDs of the fused per-expert matrices, read through transformers'
own loading); the merge's values on that layout are held to float64 by
tests/test_architectures.py::test_lox_runs_and_matches_float64_on_every_architecture.
MoE adapters: `safelora-adapter` on PEFT's all-linear LoRA of these models (attention,
routers and expert stacks, the last two as PEFT target_parameters), merged by PEFT, against
Safe LoRA in float64; GPT-OSS's transposed expert stacks refused in one line.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import reference as ref
from conftest import run_cli
from test_architectures import ALPHA, RANK, build, recipe

from mergekit_lox.demo.synthetic import load_state_dict

MOE = ["mixtral", "qwen3-moe"]
K = 2
EPS32 = float(np.finfo(np.float32).eps)


def loaded_state(path: str) -> dict:
    """The tensors as transformers' own loading gives them (its conversion, not ours)."""
    from transformers import AutoModelForCausalLM

    return {n: ref.f64(t) for n, t in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def matrices(tensor: np.ndarray) -> np.ndarray:
    return tensor.reshape(-1, *tensor.shape[-2:])


def expected_row(tau: np.ndarray, k: int) -> dict:
    """analyze's figures of one tensor in float64 (docs/analyze.md): per matrix of a stack an
    SVD; entropy the mean of the matrices' entropies (p = S / sum S over non-zero S), lssf_rank
    the largest of their LSSF ranks at eta 0.9, energy_top_k over the whole stack; also the
    distance of each matrix's energy entropy H_r to 0.9 H, so the test knows no rank sits on
    the rule's boundary."""
    entropies, ranks, top, total, margin = [], [], 0.0, 0.0, math.inf
    for M in matrices(tau):
        S = np.linalg.svd(M, compute_uv=False)
        kept = S[S > S[0] * max(M.shape) * EPS32]
        p = kept / kept.sum()
        entropies.append(float(-(p * np.log(p)).sum()))
        ranks.append(ref.lssf_rank_of(S, M.shape, 0.9))
        q = kept**2 / (kept**2).sum()
        partial = np.cumsum(-q * np.log(q))
        margin = min(margin, float(np.min(np.abs(partial - 0.9 * partial[-1]))) / partial[-1])
        top += float((S[:k] ** 2).sum())
        total += float((S**2).sum())
    return {"entropy": float(np.mean(entropies)), "lssf_rank": max(ranks), "energy_top_k": top / total}, margin


@pytest.fixture(scope="module", params=MOE)
def moe(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return request.param, root, build(request.param, root)


def test_analyze_reports_the_matrices_the_merge_decomposes(moe, capsys):
    name, root, paths = moe
    source = recipe(paths, root)
    code, _, err = run_cli(["run", source, str(root / "lox"), "--quiet"], capsys)
    assert code == 0, err
    merged = load_state_dict(str(root / "lox"))
    code, _, err = run_cli(
        [
            "analyze",
            "--base",
            paths["base"],
            "--aligned",
            paths["aligned"],
            "--finetuned",
            paths["finetuned"],
            "-o",
            str(root / "analysis"),
            "--k",
            str(K),
        ],
        capsys,
    )
    assert code == 0, err
    with open(root / "analysis" / "analysis.json", encoding="utf-8") as f:
        report = json.load(f)
    rows = {row["name"]: row for row in report["tensors"]}

    # The same tensors, by name and shape, as the merge wrote (2-D and more).
    decomposed = {n: list(t.shape) for n, t in merged.items() if t.ndim >= 2}
    assert {n: row["shape"] for n, row in rows.items()} == decomposed
    stacks = sorted(n for n, shape in decomposed.items() if len(shape) == 3)
    assert len(stacks) == 4 and all(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in stacks)
    stored = set(load_state_dict(paths["aligned"]))
    assert not set(stacks) & stored  # the checkpoint stores them per expert

    # Their figures: float64 SVDs of the fused per-expert matrices, as transformers loads them.
    base, aligned, finetuned = (loaded_state(paths[k]) for k in ("base", "aligned", "finetuned"))
    for tensor, row in rows.items():
        expected, margin = expected_row(aligned[tensor] - base[tensor], K)
        assert margin > 1e-6, (tensor, margin)  # the LSSF rank is decided away from its boundary
        assert row["lssf_rank"] == expected["lssf_rank"], tensor
        assert abs(row["entropy"] - expected["entropy"]) < 1e-5 * expected["entropy"], tensor
        assert abs(row["energy_top_k"] - expected["energy_top_k"]) < 1e-5, tensor
        cos = ref.safelora_cosine(finetuned[tensor], aligned[tensor], base[tensor])
        assert abs(row["safelora_cos"] - cos) < 1e-5, tensor
    # An expert stack counts among the linear weights of the r_align / r_ft means, once.
    linear = [n for n in rows if "embed" not in n]
    assert report["summary"]["mean_r_tensors"] == len(linear)

    # The layout matters: LoX per checkpoint matrix (w1 and w3 apart) is not what the merge computed.
    gate_up = next(n for n in stacks if n.endswith("gate_up_proj"))
    halves = [
        np.concatenate(
            [ref.lox(a, b, ALPHA, RANK) for a, b in zip(np.split(A, 2), np.split(B, 2), strict=True)], axis=0
        )
        for A, B in zip(matrices(aligned[gate_up]), matrices(base[gate_up]), strict=True)
    ]
    per_matrix = np.stack(halves).reshape(aligned[gate_up].shape)
    fused = np.stack(
        [ref.lox(a, b, ALPHA, RANK) for a, b in zip(matrices(aligned[gate_up]), matrices(base[gate_up]), strict=True)]
    ).reshape(aligned[gate_up].shape)
    assert ref.rel_err(ref.f64(merged[gate_up]), fused) < 1e-5
    difference = ref.rel_err(per_matrix, fused)
    print(f"{name}: {gate_up}: per-matrix LoX differs from the merge's fused LoX by {difference:.3%}")
    assert difference > 1e-3


# The other mixture-of-experts models of tests/test_architectures.py: where mergekit's definition
# names the checkpoint's own tensors (AFMoE's experts one by one, GraniteMoeHybrid's
# input_linear / output_linear) analyze keeps them; elsewhere transformers' fused layout.
OTHER_MOE = ["qwen2-moe", "glm4-moe", "afmoe", "granite-moe-hybrid", "deepseek-v3", "jamba", "llama4", "qwen3-vl-moe"]


@pytest.mark.parametrize("name", OTHER_MOE)
def test_analyze_names_the_tensors_the_merge_writes(name, tmp_path, capsys):
    paths = build(name, tmp_path)
    code, _, err = run_cli(["run", recipe(paths, tmp_path), str(tmp_path / "lox"), "--quiet"], capsys)
    assert code == 0, err
    merged = {n: list(t.shape) for n, t in load_state_dict(str(tmp_path / "lox")).items() if t.ndim >= 2}
    code, _, err = run_cli(
        ["analyze", "--base", paths["base"], "--aligned", paths["aligned"], "-o", str(tmp_path / "analysis")], capsys
    )
    assert code == 0, err
    with open(tmp_path / "analysis" / "analysis.json", encoding="utf-8") as f:
        assert {row["name"]: row["shape"] for row in json.load(f)["tensors"]} == merged


def test_adapter_carries_the_stacks_analyze_reports_and_peft_merges_them(moe, capsys):
    """`mergekit-lox adapter` plans through mergekit as the merge does: it names the same
    tensors as analyze. The expert stacks and the routers (not nn.Linear in transformers 5)
    go through PEFT's target_parameters (each expert's term a slice of one pair), the rest
    are LoRA modules; PEFT's merge_and_unload of the adapter is the LoX merge, stacks included."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, root, paths = moe
    source = recipe(paths, root)
    code, out, err = run_cli(["adapter", source, "-o", str(root / "adapter")], capsys)
    assert code == 0, err
    with open(root / "adapter" / "mergekit_lox_adapter.json", encoding="utf-8") as f:
        manifest = json.load(f)
    with open(root / "adapter" / "adapter_config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert not manifest["left_out"] and "left out" not in out
    stacks = {f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")}
    routers = {f"model.layers.{i}.mlp.gate.weight" for i in range(2)}
    assert set(config["target_parameters"]) == stacks | routers
    carried = {m + ".weight" for m in config["target_modules"]} | set(config["target_parameters"])
    code, _, err = run_cli(
        ["analyze", "--base", paths["base"], "--aligned", paths["aligned"], "-o", str(root / "adapter-analysis")],
        capsys,
    )
    assert code == 0, err
    with open(root / "adapter-analysis" / "analysis.json", encoding="utf-8") as f:
        analysed = {row["name"] for row in json.load(f)["tensors"]}
    assert analysed == carried
    if not (root / "lox").exists():
        code, _, err = run_cli(["run", source, str(root / "lox"), "--quiet"], capsys)
        assert code == 0, err
    merged = load_state_dict(str(root / "lox"))
    aligned = AutoModelForCausalLM.from_pretrained(paths["aligned"]).state_dict()
    model = AutoModelForCausalLM.from_pretrained(paths["aligned"])
    through_peft = PeftModel.from_pretrained(model, str(root / "adapter")).merge_and_unload().state_dict()
    worst = max(ref.rel_err(ref.f64(through_peft[n]), ref.f64(merged[n])) for n in carried)
    assert worst < 1e-5, worst
    moved = min(ref.rel_err(ref.f64(merged[n]), ref.f64(aligned[n])) for n in stacks)
    assert moved > 1e-3  # the stacks' terms are there, not zero


# --------------------------------------------------------------------------- safelora-adapter on MoE LoRAs


def train_free_lora(aligned: str, out: str, **options) -> str:
    """A PEFT LoRA on the aligned model with random A and B (no training: the projection
    does not care how they were found), saved as PEFT saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(aligned)
    config = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **options)
    get_peft_model(model, config).save_pretrained(out)
    return out


def lora_updates(adapter: str, aligned: dict) -> dict:
    """{parameter: s B A in float64}, by PEFT's documented layouts, computed here (not by
    PEFT or our code): an nn.Linear or a 2-D parameter is s B A; an expert stack of E
    experts stores A [E r, in] and B [out, r E], expert e's update s B[:, e::E] A[e r:(e+1) r].
    The two stacks of one experts module (one saved under .base_layer) are told apart by
    their [out, in], against ``aligned`` (name -> array); the tiny models keep them distinct."""
    from safetensors.torch import load_file

    with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as f:
        config = json.load(f)

    def pattern(table, weight, default):
        return next((v for k, v in table.items() if re.search(k + "$", weight)), default)

    tensors = {k: ref.f64(v) for k, v in load_file(os.path.join(adapter, "adapter_model.safetensors")).items()}
    updates = {}
    for key, A in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        B = tensors[key.replace(".lora_A.weight", ".lora_B.weight")]
        owner = key[: -len(".lora_A.weight")].removeprefix("base_model.model.").replace(".base_layer", "")
        if owner.endswith(".experts"):
            weight = next(
                f"{owner}.{p}"
                for p in ("gate_up_proj", "down_proj")
                if aligned[f"{owner}.{p}"].shape[1:] == (B.shape[0], A.shape[1])
            )
        else:
            weight = owner + ".weight"
        experts = aligned[weight].shape[0] if aligned[weight].ndim == 3 else 1
        rank = A.shape[0] // experts
        assert rank == pattern(config["rank_pattern"], weight, config["r"]), weight
        scaling = pattern(config["alpha_pattern"], weight, config["lora_alpha"]) / rank
        updates[weight] = np.stack(
            [scaling * B[:, e::experts] @ A[e * rank : (e + 1) * rank] for e in range(experts)]
        ).reshape(aligned[weight].shape)
    return updates


@pytest.mark.parametrize("threshold", [2.0, None])
def test_safelora_adapter_projects_an_all_linear_moe_lora(moe, threshold, capsys):
    """PEFT's all-linear on Mixtral / Qwen3-MoE targets attention (nn.Linear), the routers and
    both expert stacks (target_parameters). The projected adapter, merged by PEFT, equals
    Safe LoRA in float64 on every adapted weight: each expert's update projected with its own
    C, one decision per stack, as safelora_project decides on the stack the merge reads.
    Threshold 2 projects every weight; None: one between the float64 cosines."""
    name, root, paths = moe
    check_projected_moe_lora(name, root, paths, threshold, capsys)


@pytest.mark.parametrize("name", ["glm4-moe", "afmoe", "deepseek-v3"])
def test_safelora_adapter_projects_other_moe_loras(name, tmp_path, capsys):
    """The other families whose all-linear LoRA PEFT 0.21 extends to routers and expert stacks."""
    check_projected_moe_lora(name, tmp_path, build(name, tmp_path), 2.0, capsys)


def check_projected_moe_lora(name, root, paths, threshold, capsys):
    from peft import PeftModel
    from safelora_helpers import threshold_between
    from test_architectures import model_class

    adapter = str(root / "lora")
    if not os.path.isdir(adapter):
        train_free_lora(paths["aligned"], adapter, target_modules="all-linear")
    with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as f:
        assert set(json.load(f)["target_parameters"]) == {"gate.weight", "gate_up_proj", "down_proj"}
    base, aligned = loaded_state(paths["base"]), loaded_state(paths["aligned"])
    updates = lora_updates(adapter, aligned)
    stacks = {n for n, u in updates.items() if u.ndim == 3}
    assert stacks and all(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in stacks)
    finetuned = {n: aligned[n] + u for n, u in updates.items()}
    cosines = {n: ref.safelora_cosine(finetuned[n], aligned[n], base[n]) for n in updates}
    if threshold is None:
        threshold = threshold_between(cosines)
    out = root / f"projected-{threshold}"
    code, _, err = run_cli(
        ["safelora-adapter", "--base", paths["base"], "--aligned", paths["aligned"], "--adapter", adapter]
        + ["-o", str(out), "--threshold", repr(threshold)],
        capsys,
    )
    assert code == 0, err
    with open(out / "safelora.json", encoding="utf-8") as f:
        report = {m["module"]: m for m in json.load(f)["modules"]}
    assert stacks <= set(report)  # named by the parameter, not PEFT's ...experts.base_layer
    merged = PeftModel.from_pretrained(model_class(name).from_pretrained(paths["aligned"]), str(out))
    merged = {n: ref.f64(t) for n, t in merged.merge_and_unload().state_dict().items()}
    projected = set()
    for weight, W_f in finetuned.items():
        expected = ref.safelora(W_f, aligned[weight], base[weight], threshold)
        assert ref.rel_err(merged[weight], expected) < 1e-5, weight
        if expected is not W_f:
            projected.add(weight)
            assert ref.rel_err(merged[weight], W_f) > 1e-3, weight  # the projection changed it
    assert {w for w, c in cosines.items() if c <= threshold} == projected
    if threshold == 2.0:
        assert projected == set(updates)
    else:
        assert 0 < len(projected) < len(updates)
    print(f"{name}: threshold {threshold:.4g}: {len(projected)} of {len(updates)} weights projected")


def test_safelora_adapter_refuses_a_transposed_expert_stack_in_one_line(tmp_path, capsys):
    """GPT-OSS stores its experts [experts, in, out] (PEFT applies (B_e A_e)ᵀ): safelora-adapter
    does not project that layout; it says so naming the parameter, exit 1, nothing written."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = transformers.GptOssConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["full_attention", "sliding_attention"],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    for role in ("base", "aligned"):
        model.save_pretrained(tmp_path / role)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj"])
    get_peft_model(model, lora).save_pretrained(tmp_path / "lora")
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["safelora-adapter", "--base", str(tmp_path / "base"), "--aligned", str(tmp_path / "aligned")]
        + ["--adapter", str(tmp_path / "lora"), "-o", str(out)],
        capsys,
    )
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1, err
    assert "parameter model.layers.0.mlp.experts.gate_up_proj is an expert stack stored [experts, in, out]" in errors[0]
    assert "safelora_project" in errors[0] and "Traceback" not in err
    assert not out.exists()


def test_the_api_projects_an_all_linear_moe_peft_model_in_place(moe):
    """api.apply_safelora on a live PeftModel whose all-linear LoRA targets the routers and the
    expert stacks (target_parameters): merged afterwards, it is Safe LoRA in float64 on every
    adapted weight, each expert projected with its own C (threshold 2: every weight)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mergekit_lox import api

    name, root, paths = moe
    adapter = str(root / "lora")
    if not os.path.isdir(adapter):
        train_free_lora(paths["aligned"], adapter, target_modules="all-linear")
    base, aligned = loaded_state(paths["base"]), loaded_state(paths["aligned"])
    updates = lora_updates(adapter, aligned)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(paths["aligned"]), adapter)
    base_model = AutoModelForCausalLM.from_pretrained(paths["base"])
    aligned_model = AutoModelForCausalLM.from_pretrained(paths["aligned"])
    records = api.apply_safelora(peft_model, base_model, aligned_model, threshold=2.0)
    assert {r.weight for r in records} == set(updates) and all(r.projected for r in records)
    merged = {n: ref.f64(t) for n, t in peft_model.merge_and_unload().state_dict().items()}
    for weight, update in updates.items():
        expected = ref.safelora(aligned[weight] + update, aligned[weight], base[weight], 2.0)
        assert ref.rel_err(merged[weight], expected) < 1e-5, weight
