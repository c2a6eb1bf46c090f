"""`mergekit-lox analyze`: every value vs float64, the files, bounded memory, CLI, demo."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from contextlib import contextmanager

import numpy as np
import pytest
import reference as ref
import torch
from conftest import run_cli
from safetensors.torch import save_file

from mergekit_lox.analyze import FINETUNED_KEYS, TENSOR_KEYS, analyze_models, run_analysis
from mergekit_lox.demo.synthetic import load_state_dict
from mergekit_lox.html.svg import fmt as _fmt

SVG = "{http://www.w3.org/2000/svg}"
REL = 2e-5  # float32 math against float64: ratios and entropies agree to ~1e-6


@contextmanager
def single_thread():
    """Tiny matrices on a shared 2-core box: OpenMP threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _single_thread():
    with single_thread():
        yield


# --------------------------------------------------------------------------- reference


def reference_row(W_b: np.ndarray, W_a: np.ndarray, W_f, k: int) -> dict:
    """Every metric from docs/methods.md notation, in NumPy float64, from the definitions.

    P_k is formed explicitly as U_k U_kᵀ; a stack gets one P_k per matrix, norms
    over the whole tensor, the mean entropy and the largest LSSF rank.
    """
    tau = W_a - W_b
    shape = tau.shape
    stack = tau.reshape(-1, *shape[-2:])
    drift = None if W_f is None else (W_f - W_a) + tau
    drift_stack = None if drift is None else drift.reshape(stack.shape)
    entropies, ranks, kept_tau, kept_drift = [], [], 0.0, 0.0
    for i, M in enumerate(stack):
        S = np.linalg.svd(M, compute_uv=False)
        nonzero = S[S > S[0] * max(shape[-2:]) * np.finfo(np.float32).eps] if S[0] > 0 else S[:0]
        p = nonzero / nonzero.sum() if nonzero.size else nonzero
        entropies.append(float(-np.sum(p * np.log(p))))
        ranks.append(ref.lssf_rank_of(S, shape, 0.9))
        U = np.linalg.svd(M, full_matrices=False)[0][:, :k]
        P = U @ U.T
        kept_tau += np.linalg.norm(P @ M) ** 2
        if drift_stack is not None:
            kept_drift += np.linalg.norm(P @ drift_stack[i]) ** 2
    entropy = float(np.mean(entropies))
    row = {
        "shape": list(shape),
        "entropy": entropy,
        "effective_rank": math.exp(entropy),
        "lssf_rank": max(ranks),
        "energy_top_k": kept_tau / np.linalg.norm(tau) ** 2 if tau.any() else None,
        "r_align": math.sqrt(kept_tau) / np.linalg.norm(tau) if tau.any() else None,
    }
    if W_f is not None:
        row["r_ft"] = math.sqrt(kept_drift) / np.linalg.norm(drift) if tau.any() and drift.any() else None
        row["safelora_cos"] = ref.safelora_cosine(W_f, W_a, W_b) if tau.any() and (W_f - W_a).any() else None
    return row


def assert_row_matches(row: dict, expected: dict, name: str) -> None:
    assert row["shape"] == expected["shape"], name
    assert row["lssf_rank"] == expected["lssf_rank"], name
    for key, value in expected.items():
        if key in ("shape", "lssf_rank"):
            continue
        if value is None:
            assert row[key] is None, (name, key)
        else:
            assert row[key] == pytest.approx(value, rel=REL, abs=1e-6), (name, key)


def assert_matches_reference(analysis, states, k: int, has_finetuned: bool = True) -> None:
    base, aligned, finetuned = (states[r] for r in ("base", "aligned", "finetuned"))
    for row in analysis.tensors:
        name = row["name"]
        expected = reference_row(
            ref.f64(base[name]),
            ref.f64(aligned[name]),
            ref.f64(finetuned[name]) if has_finetuned else None,
            k,
        )
        assert_row_matches(row, expected, name)


def write_model(path, tensors: dict, per_shard: int = 0) -> str:
    """A safetensors model directory; sharded with an index when ``per_shard`` > 0."""
    os.makedirs(path, exist_ok=True)
    names = list(tensors)
    if not per_shard:
        save_file({n: t.contiguous() for n, t in tensors.items()}, os.path.join(path, "model.safetensors"))
        return str(path)
    shards = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for i, chunk in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in chunk}, os.path.join(path, filename))
        weight_map.update({n: filename for n in chunk})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(path)


# --------------------------------------------------------------------------- fixtures

PROJECTED = "model.layers.0.self_attn.q_proj.weight"
KEPT = "model.layers.0.mlp.down_proj.weight"
STACK = "model.layers.0.mlp.experts.weight"
ZERO_TAU = "model.layers.0.self_attn.zero.weight"
UNCHANGED = "model.layers.0.self_attn.unchanged.weight"


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """Tensors whose analysis is predictable: one Safe LoRA must project, one not,
    a stack of matrices, a zero safety vector, an untouched tensor and a 1-D norm."""
    g = torch.Generator().manual_seed(5)

    def low_rank(m, n, r, strength=1.0):
        return (
            strength
            * torch.randn(m, r, generator=g, dtype=torch.float64)
            @ torch.randn(r, n, generator=g, dtype=torch.float64)
        )

    base = {
        PROJECTED: torch.randn(24, 16, generator=g),
        KEPT: torch.randn(16, 24, generator=g),
        STACK: torch.randn(3, 12, 20, generator=g),
        ZERO_TAU: torch.randn(8, 8, generator=g),
        UNCHANGED: torch.randn(10, 12, generator=g),
        "model.norm.weight": torch.ones(16),
    }
    tau = {
        PROJECTED: low_rank(24, 16, 3) + 0.02 * torch.randn(24, 16, generator=g, dtype=torch.float64),
        KEPT: low_rank(16, 24, 2) + 0.02 * torch.randn(16, 24, generator=g, dtype=torch.float64),
        # Ranks >= k = 2 plus noise: P_k is well defined in every matrix of the stack.
        STACK: torch.stack([low_rank(12, 20, r, 0.5) for r in (2, 3, 6)])
        + 0.02 * torch.randn(3, 12, 20, generator=g, dtype=torch.float64),
        ZERO_TAU: torch.zeros(8, 8, dtype=torch.float64),
        UNCHANGED: low_rank(10, 12, 4),
        "model.norm.weight": 0.1 * torch.randn(16, generator=g, dtype=torch.float64),
    }
    update = {
        # A random update: little of it lies in tau's 3-dimensional column space, so
        # Safe LoRA's cosine is low (about sqrt(3/24)) and the tensor is projected.
        PROJECTED: 0.5 * torch.randn(24, 16, generator=g, dtype=torch.float64),
        # Undoing half of tau: the update lies in the alignment subspace, cos near 1.
        KEPT: -0.5 * tau[KEPT] + 0.01 * torch.randn(16, 24, generator=g, dtype=torch.float64),
        STACK: -0.3 * tau[STACK] + 0.01 * torch.randn(3, 12, 20, generator=g, dtype=torch.float64),
        ZERO_TAU: 0.3 * torch.randn(8, 8, generator=g, dtype=torch.float64),
        UNCHANGED: torch.zeros(10, 12, dtype=torch.float64),
        "model.norm.weight": torch.zeros(16, dtype=torch.float64),
    }
    aligned = {n: (base[n].double() + tau[n]).float() for n in base}
    aligned[ZERO_TAU] = base[ZERO_TAU].clone()
    finetuned = {n: (aligned[n].double() + update[n]).float() for n in base}
    finetuned[UNCHANGED] = aligned[UNCHANGED].clone()
    root = tmp_path_factory.mktemp("crafted")
    paths = {
        "base": write_model(root / "base", base),
        "aligned": write_model(root / "aligned", aligned, per_shard=2),
        "finetuned": write_model(root / "finetuned", finetuned, per_shard=4),
    }
    return paths, {"base": base, "aligned": aligned, "finetuned": finetuned}


@pytest.fixture(scope="module")
def family_analysis(family):
    return analyze_models(family.base, family.aligned, family.finetuned, k=6)


# --------------------------------------------------------------------------- values


def test_every_value_matches_float64_on_the_llama_family(family, states, family_analysis):
    analysis = family_analysis
    two_d = sorted(n for n, t in states["aligned"].items() if t.ndim >= 2)
    assert sorted(r["name"] for r in analysis.tensors) == two_d
    assert analysis.summary["tensors_skipped_below_2d"] == len(states["aligned"]) - len(two_d)
    for row in analysis.tensors:
        assert tuple(row) == TENSOR_KEYS + FINETUNED_KEYS
    assert_matches_reference(analysis, states, k=6)


def test_summary_recovers_the_planted_structure(family, states, family_analysis):
    summary = family_analysis.summary
    # Every weight's planted safety component has rank 4 with distinct singular
    # values well above the diffuse part: the largest spectral gap is after the 4th.
    assert summary["suggested_lox_rank"] == 4
    rows = family_analysis.tensors
    # The means cover the nn.Linear weights, as LoX's R_metrics.py: every 2-D weight but the
    # embedding (lm_head is an nn.Linear); the *_all means cover every tensor.
    linear = [r for r in rows if r["name"] != "model.embed_tokens.weight"]
    assert summary["mean_r_tensors"] == len(linear) == len(rows) - 1
    assert summary["mean_r_align"] == pytest.approx(np.mean([r["r_align"] for r in linear]))
    assert summary["mean_r_ft"] == pytest.approx(np.mean([r["r_ft"] for r in linear]))
    assert summary["mean_r_align_all"] == pytest.approx(np.mean([r["r_align"] for r in rows]))
    assert summary["mean_r_ft_all"] == pytest.approx(np.mean([r["r_ft"] for r in rows]))
    # The synthetic fine-tune removes 60% of the planted component: r_ft < r_align.
    assert all(r["r_ft"] < r["r_align"] for r in rows)
    # The curves' k = 6 point is the mean of the per-tensor values at k = 6.
    curves = summary["curves"]
    assert curves["r_ft"][5] == pytest.approx(summary["mean_r_ft_all"], rel=1e-9)
    assert curves["energy"][5] == pytest.approx(summary["mean_energy_top_k"], rel=1e-9)
    cosines = {
        r["name"]: ref.safelora_cosine(*(ref.f64(states[m][r["name"]]) for m in ("finetuned", "aligned", "base")))
        for r in rows
    }
    assert [p["name"] for p in summary["safelora"]["projected"]] == sorted(
        (n for n, c in cosines.items() if c <= 0.5), key=cosines.get
    )
    # SafeMERGE: the same cosine against safemerge's default threshold, strictly.
    from mergekit.merge_methods import get

    threshold = next(p.default for p in get("safemerge").spec.parameters if p.name == "threshold")
    assert summary["safemerge"]["threshold"] == threshold == 0.35
    assert [p["name"] for p in summary["safemerge"]["merged"]] == sorted(
        (n for n, c in cosines.items() if c < threshold), key=cosines.get
    )
    spectra = summary["representative_spectra"]
    # One tensor per module type at the middle layer (of 2: layer 1), then embed and lm_head.
    assert len(spectra) == 9 and "model.layers.1.self_attn.q_proj.weight" in spectra
    S = np.linalg.svd(
        ref.f64(states["aligned"]["lm_head.weight"]) - ref.f64(states["base"]["lm_head.weight"]), compute_uv=False
    )
    np.testing.assert_allclose(spectra["lm_head.weight"], S[:64], rtol=1e-4)


def test_crafted_tensors_stack_zero_and_safelora(crafted):
    paths, states = crafted
    analysis = analyze_models(paths["base"], paths["aligned"], paths["finetuned"], k=2)
    rows = {r["name"]: r for r in analysis.tensors}
    assert set(rows) == {PROJECTED, KEPT, STACK, ZERO_TAU, UNCHANGED}
    assert_matches_reference(analysis, states, k=2)
    assert rows[STACK]["shape"] == [3, 12, 20]
    # Zero tau: no subspace; unchanged tensor: dW = 0, so r_ft is r_align and no cosine.
    assert (rows[ZERO_TAU]["entropy"], rows[ZERO_TAU]["effective_rank"], rows[ZERO_TAU]["lssf_rank"]) == (0.0, 1.0, 1)
    assert rows[ZERO_TAU]["r_align"] is None and rows[ZERO_TAU]["r_ft"] is None
    assert rows[UNCHANGED]["safelora_cos"] is None
    assert rows[UNCHANGED]["r_ft"] == pytest.approx(rows[UNCHANGED]["r_align"], rel=1e-6)
    assert [p["name"] for p in analysis.summary["safelora"]["projected"]] == [PROJECTED]
    assert rows[PROJECTED]["safelora_cos"] < 0.5 < 0.9 < rows[KEPT]["safelora_cos"]
    # safemerge merges what its cosine puts strictly below its default 0.35.
    assert rows[PROJECTED]["safelora_cos"] < 0.33  # clear of 0.35 by more than rounding
    assert [p["name"] for p in analysis.summary["safemerge"]["merged"]] == [PROJECTED]


def test_bf16_sharded_family_with_filter(family_bf16_sharded):
    fam = family_bf16_sharded
    states = {role: load_state_dict(getattr(fam, role)) for role in ("base", "aligned", "finetuned")}
    analysis = analyze_models(fam.base, fam.aligned, fam.finetuned, k=3, name_filter="mlp.")
    expected = sorted(n for n, t in states["aligned"].items() if "mlp." in n and t.ndim >= 2)
    assert sorted(r["name"] for r in analysis.tensors) == expected
    assert analysis.summary["tensors_filtered_out"] == len(states["aligned"]) - len(expected)
    assert_matches_reference(analysis, states, k=3)


def test_without_finetuned_the_rows_have_no_finetuned_keys(family, states):
    analysis = analyze_models(family.base, family.aligned, k=1, name_filter="layers.0.self_attn")
    assert len(analysis.tensors) == 4
    for row in analysis.tensors:
        assert tuple(row) == TENSOR_KEYS
    assert "safelora" not in analysis.summary and "r_ft" not in analysis.summary["curves"]
    assert_matches_reference(analysis, states, k=1, has_finetuned=False)


# --------------------------------------------------------------------------- files


def _strict_json(path):
    def no_constant(name):
        raise AssertionError(f"{path}: non-standard JSON constant {name}")

    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=no_constant)


def _csv_matches(path, analysis_json, columns):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        body = list(reader)
    assert tuple(header) == columns
    assert len(body) == len(analysis_json["tensors"])
    for cells, row in zip(body, analysis_json["tensors"], strict=True):
        for column, cell in zip(columns, cells, strict=True):
            value = row[column]
            if column == "name":  # a name a spreadsheet would run is shown as text
                assert cell == ("'" + value if value[:1] in "=+-@" else value)
            elif column == "shape":
                assert cell == "x".join(map(str, value))
            elif value is None:
                assert cell == ""
            else:
                assert float(cell) == value


def _report_checks(path, analysis_json, heatmaps: int):
    with open(path, encoding="utf-8") as f:
        html = f.read()
    root = ET.fromstring(html)  # well-formed: a strict XML parser reads it
    # Self-contained: nothing is fetched when the file is opened.
    assert not [e for e in root.iter() if e.tag.split("}")[-1] in ("script", "img", "link", "iframe", "object")]
    assert not [e for e in root.iter() if set(e.attrib) & {"src", "href"}]
    assert "url(" not in html
    svgs = list(root.iter(SVG + "svg"))
    maps = [s for s in svgs if s.get("aria-label", "").endswith("per layer")]
    assert len(maps) == heatmaps
    layered = [r for r in analysis_json["tensors"] if ".layers." in r["name"]]
    for svg in maps:
        cells = [rect for rect in svg.iter(SVG + "rect") if rect.find(SVG + "title") is not None]
        assert len(cells) == len(layered)
    # Each cell's tooltip names its tensor and gives its value (first map: effective rank).
    titles = [t.text for t in maps[0].iter(SVG + "title")]
    for row in layered:
        assert f"{row['name']} [{_fmt(row['shape'])}]: effective rank = {_fmt(row['effective_rank'], 4)}" in titles
    spectra = [s for s in svgs if s.get("aria-label", "").startswith("spectrum of")]
    assert len(spectra) == len(analysis_json["summary"]["representative_spectra"])
    assert "suggested LoX rank" in html and str(analysis_json["summary"]["suggested_lox_rank"]) in html
    return root, html


def test_files_are_written_and_well_formed(crafted, tmp_path):
    paths, _ = crafted
    out = tmp_path / "report"
    written = run_analysis(paths["base"], paths["aligned"], str(out), paths["finetuned"], k=2)
    assert sorted(os.listdir(out)) == [".mergekit_lox_files.json", "analysis.csv", "analysis.json", "report.html"]
    data = _strict_json(written["json"])
    assert set(data) == {"tensors", "summary", "inputs"}
    assert data["inputs"]["finetuned"] == os.path.abspath(paths["finetuned"]) and data["inputs"]["k"] == 2
    for row in data["tensors"]:
        assert tuple(row) == TENSOR_KEYS + FINETUNED_KEYS
    _csv_matches(written["csv"], data, TENSOR_KEYS + FINETUNED_KEYS)
    root, html = _report_checks(written["html"], data, heatmaps=3)
    # The Safe LoRA table lists exactly the projected tensor.
    tables = list(root.iter("{http://www.w3.org/1999/xhtml}table"))
    assert any(
        [td.text for td in table.iter("{http://www.w3.org/1999/xhtml}td") if td.get("class") == "name"] == [PROJECTED]
        for table in tables
    )


def test_report_of_the_llama_family(family, family_analysis, tmp_path):
    from mergekit_lox.analyze import write_outputs

    written = write_outputs(family_analysis, str(tmp_path / "out"))
    data = _strict_json(written["json"])
    assert data["tensors"] == json.loads(json.dumps(family_analysis.tensors))
    _csv_matches(written["csv"], data, TENSOR_KEYS + FINETUNED_KEYS)
    _, html = _report_checks(written["html"], data, heatmaps=3)
    assert "self_attn.q_proj" in html and "mlp.down_proj" in html


# --------------------------------------------------------------------------- memory

_BOUNDED_CHILD = r"""
import json, os, resource, sys
import torch
from safetensors.torch import load_file
from mergekit_lox.analyze import run_analysis
import csv, io, tqdm, mergekit.io.lazy_tensor_loader, mergekit_lox.analyze.report, mergekit_lox.methods.safelora
torch.linalg.svd(torch.randn(64, 32))  # LAPACK and allocator warm-up before the baseline

def data_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024

root, headroom = sys.argv[1], int(sys.argv[2])
baseline = data_bytes()
# RLIMIT_DATA caps private writable memory: heap, anonymous maps, and the shard
# files safetensors maps; the interpreter and torch are already under it.
resource.setrlimit(resource.RLIMIT_DATA, (baseline + headroom, resource.RLIM_INFINITY))
models = [os.path.join(root, m) for m in ("base", "aligned", "finetuned")]
run_analysis(models[0], models[1], os.path.join(root, "out"), models[2], k=2)
used = data_bytes() - baseline
try:  # control: loading the models whole must not fit under the same cap
    whole = [load_file(os.path.join(m, f)) for m in models for f in sorted(os.listdir(m)) if f.endswith(".safetensors")]
    control = "loaded"
except (MemoryError, RuntimeError) as error:
    control = str(error)
print(json.dumps({"used": used, "control": control}))
"""


def test_memory_stays_bounded_below_the_model_size(tmp_path):
    """Three 96 MiB models (288 MiB) analysed under a 64 MiB cap above the baseline."""
    headroom = 64 << 20
    g = torch.Generator().manual_seed(9)
    names = [f"model.layers.{i}.mlp.proj.weight" for i in range(96)]
    # 1 MiB each, tall and thin so that their SVDs are cheap.
    shared_base = torch.randn(16384, 16, generator=g)

    def low_rank():
        return 0.1 * torch.randn(16384, 2, generator=g) @ torch.randn(2, 16, generator=g)

    base = {n: shared_base for n in names}
    aligned = {n: shared_base + low_rank() for n in names}
    finetuned = {n: aligned[n] + low_rank() for n in names}
    sizes = 0
    for role, tensors in (("base", base), ("aligned", aligned), ("finetuned", finetuned)):
        write_model(tmp_path / role, {n: t.clone() for n, t in tensors.items()}, per_shard=12)
        sizes += sum(os.path.getsize(tmp_path / role / f) for f in os.listdir(tmp_path / role))
    assert sizes > 4 * headroom

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _BOUNDED_CHILD, str(tmp_path), str(headroom)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["control"] != "loaded" and "memory" in result["control"].lower(), result
    assert result["used"] < headroom

    data = _strict_json(tmp_path / "out" / "analysis.json")
    assert [r["name"] for r in data["tensors"]] == names
    for row in data["tensors"][::40]:
        name = row["name"]
        W_b, W_a, W_f = (ref.f64(t[name]) for t in (base, aligned, finetuned))
        tau, drift = W_a - W_b, W_f - W_b
        U = np.linalg.svd(tau, full_matrices=False)[0][:, :2]
        # P_k X = U_k (U_kᵀ X) and C dW = V (Vᵀ dW) / ||V||: no 16384 x 16384 matrix.
        assert row["r_align"] == pytest.approx(np.linalg.norm(U @ (U.T @ tau)) / np.linalg.norm(tau), rel=REL)
        assert row["r_ft"] == pytest.approx(np.linalg.norm(U @ (U.T @ drift)) / np.linalg.norm(drift), rel=REL)
        V, dW = tau, W_f - W_a
        CdW = V @ (V.T @ dW) / np.linalg.norm(V)
        cos = np.sum(CdW * dW) / (np.linalg.norm(CdW) * np.linalg.norm(dW))
        assert row["safelora_cos"] == pytest.approx(cos, rel=REL)


# --------------------------------------------------------------------------- CLI and demo


def test_cli_writes_the_report_and_says_where(family, tmp_path, capsys):
    out = tmp_path / "analysis"
    code, stdout, err = run_cli(
        [
            "analyze",
            "--base",
            family.base,
            "--aligned",
            family.aligned,
            "-o",
            str(out),
            "--k",
            "2",
            "--filter",
            "layers.1.",
        ],
        capsys,
    )
    assert code == 0, err
    assert f"report: {out / 'report.html'}" in stdout
    data = _strict_json(out / "analysis.json")
    assert len(data["tensors"]) == 7 and data["inputs"]["filter"] == "layers.1."
    assert all(tuple(r) == TENSOR_KEYS for r in data["tensors"])
    _report_checks(out / "report.html", data, heatmaps=2)
    assert "analyze" in err  # the progress bar went to stderr


@pytest.mark.parametrize(
    "case",
    [
        "missing-model",
        "hub-id-offline",
        "output-inside-input",
        "filter-matches-nothing",
        "shape-mismatch",
        "bad-device",
    ],
)
def test_cli_errors_are_one_line_naming_the_culprit(case, family, crafted, tmp_path, capsys):
    paths, tensors = crafted
    args = ["analyze", "--base", family.base, "--aligned", family.aligned, "-o", str(tmp_path / "out")]
    culprit = None
    if case == "missing-model":
        args[2] = culprit = str(tmp_path / "nowhere")
    elif case == "hub-id-offline":  # conftest sets HF_HUB_OFFLINE: mergekit's hub lookup fails
        args[4] = culprit = "no-such-org/no-such-model"
    elif case == "output-inside-input":
        args[-1] = culprit = os.path.join(family.aligned, "report")
    elif case == "filter-matches-nothing":
        args += ["--filter", "no_such_tensor"]
        culprit = "no_such_tensor"
    elif case == "shape-mismatch":
        other = dict(tensors["base"])
        other[KEPT] = torch.zeros(16, 25)
        args[2] = write_model(tmp_path / "other_base", other)
        args[4] = paths["aligned"]
        culprit = KEPT
    else:
        args += ["--device", "no_such_device"]
        culprit = "no_such_device"
    before = sorted(os.listdir(family.aligned))
    code, _, err = run_cli(args, capsys)
    assert code == 1
    # Only the progress bar (carriage-return updates) may come before the one error line.
    lines = err.strip().splitlines()
    assert all(line.startswith(("analyze:", "error: ")) for line in lines), err
    assert lines[-1].startswith("error: ") and culprit in lines[-1], err
    assert "Traceback" not in err and sum(line.startswith("error:") for line in lines) == 1
    assert sorted(os.listdir(family.aligned)) == before
    assert not os.path.exists(tmp_path / "out" / "analysis.json")


def test_cli_rejects_k_zero(family, tmp_path, capsys):
    code, _, err = run_cli(
        ["analyze", "--base", family.base, "--aligned", family.aligned, "-o", str(tmp_path / "o"), "--k", "0"], capsys
    )
    assert code == 2 and "--k" in err


def test_demo_writes_the_report_of_its_models(tmp_path, monkeypatch):
    """The demo's last step analyses the demo models (merges stubbed: they are
    tested in test_cli; here only the analysis step is under test)."""
    import shutil

    from mergekit_lox import demo

    def copy_aligned(recipe, out):
        import yaml

        with open(recipe) as f:
            aligned = next(m["model"] for m in yaml.safe_load(f)["models"] if m["parameters"]["role"] == "aligned")
        shutil.copytree(aligned, out)

    lines = []
    demo.run_demo(str(tmp_path / "demo"), copy_aligned, echo=lines.append, behaviour=False)
    report = os.path.abspath(tmp_path / "demo" / "analysis" / "report.html")
    assert lines[-1].endswith(report) and os.path.isfile(report)
    data = _strict_json(tmp_path / "demo" / "analysis" / "analysis.json")
    assert data["inputs"]["finetuned"] == os.path.abspath(tmp_path / "demo" / "models" / "finetuned")
    assert data["summary"]["suggested_lox_rank"] == 4


def test_a_tensor_name_that_is_a_formula_is_text_in_the_csv(tmp_path):
    """Issue 23: tensor names come from the checkpoint and went raw into CSV cells."""
    g = torch.Generator().manual_seed(9)
    names = ['=HYPERLINK("http://x","y").weight', "@SUM(A1).weight", "model.ok.weight"]
    base = {n: torch.randn(8, 6, generator=g) for n in names}
    aligned = {n: t + 0.1 * torch.randn(8, 6, generator=g) for n, t in base.items()}
    written = run_analysis(
        write_model(tmp_path / "b", base), write_model(tmp_path / "a", aligned), str(tmp_path / "out"), k=2
    )
    with open(written["csv"], newline="", encoding="utf-8") as f:
        cells = {row[0] for row in list(csv.reader(f))[1:]}
    assert cells == {"'" + names[0], "'" + names[1], names[2]}
    _csv_matches(written["csv"], _strict_json(written["json"]), TENSOR_KEYS)
