"""Issue 26, MoE: one truth. transformers 5 loads Mixtral's and Qwen3-MoE's per-expert
checkpoints as fused stacks (experts.gate_up_proj [E, 2I, H], experts.down_proj), mergekit
0.1.5's loader converts them the same way, and the merges decompose each expert's fused
gate-and-up matrix. `analyze` and `adapter` must name and measure those same matrices
(held here to float64 SVDs of the fused per-expert matrices, read through transformers'
own loading); the merge's values on that layout are held to float64 by
tests/test_architectures.py::test_lox_runs_and_matches_float64_on_every_architecture.
"""

from __future__ import annotations

import json
import math

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


def test_adapter_leaves_out_the_stacks_analyze_reports(moe, capsys):
    """`mergekit-lox adapter` plans through mergekit as the merge does: it names the same
    tensors as analyze, the expert stacks (and the routers, not nn.Linear in transformers 5)
    listed as left out, everything else a LoRA module."""
    _, root, paths = moe
    code, out, err = run_cli(["adapter", recipe(paths, root), "-o", str(root / "adapter")], capsys)
    assert code == 0, err
    with open(root / "adapter" / "mergekit_lox_adapter.json", encoding="utf-8") as f:
        manifest = json.load(f)
    left_out = manifest["left_out"]
    stacks = {n for n in left_out if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    # transformers 5's routers are not nn.Linear (MixtralTopKRouter, Qwen3MoeTopKRouter): left out
    # too, under the name the merge uses (Mixtral's checkpoint stores block_sparse_moe.gate).
    routers = {f"model.layers.{i}.mlp.gate.weight" for i in range(2)}
    assert len(stacks) == 4 and set(left_out) == stacks | routers, left_out
    assert all("3-D stack" in left_out[n] for n in stacks)
    assert all("TopKRouter module" in left_out[n] for n in routers)
    for name in left_out:
        assert name in out  # the terminal says so, naming each
    modules = {m + ".weight" for m in manifest["modules"]}
    code, _, err = run_cli(
        ["analyze", "--base", paths["base"], "--aligned", paths["aligned"], "-o", str(root / "adapter-analysis")],
        capsys,
    )
    assert code == 0, err
    with open(root / "adapter-analysis" / "analysis.json", encoding="utf-8") as f:
        analysed = {row["name"] for row in json.load(f)["tensors"]}
    assert analysed == modules | set(left_out)
