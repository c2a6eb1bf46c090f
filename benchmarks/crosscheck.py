"""Cross-checks against the authors' own code, on tiny local models (not a test).

The authors' repositories are not part of this project and are never copied into it:
clone one anywhere and pass its directory with ``--code``. Each check builds the demo's
tiny Llama family (and PEFT LoRA adapters where the method works on adapters), runs the
authors' code and our merge method on the same inputs, and prints, per weight matrix,
the cosine each computes, the decision each takes and the relative Frobenius distance
between the two results. docs/fidelity.md quotes the figures.

    python benchmarks/crosscheck.py lox       --code /tmp/LoX        # github.com/VITA-Group/LoX
    python benchmarks/crosscheck.py safelora  --code /tmp/SafeLoRA   # github.com/IBM/SafeLoRA
    python benchmarks/crosscheck.py safemerge --code /tmp/SafeMERGE  # github.com/aladinD/SafeMERGE

One shim is applied to the authors' code, nothing else: transformers 5 no longer accepts
``from_pretrained(..., load_in_8bit=False)`` (False is the default), so that keyword is
dropped before the call.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import subprocess
import sys
import tempfile

import torch

from mergekit_lox.demo.synthetic import FamilySpec, build_family, load_state_dict

TARGETS = ("q_proj", "v_proj", "down_proj")
RANK = 4


class _WithoutLoadIn8bit:
    """``AutoModelForCausalLM`` for the authors' modules, minus ``load_in_8bit=False``."""

    @staticmethod
    def from_pretrained(path, load_in_8bit=False, **kwargs):
        from transformers import AutoModelForCausalLM

        assert load_in_8bit is False
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def authors_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(path))
    spec.loader.exec_module(module)
    module.AutoModelForCausalLM = _WithoutLoadIn8bit
    return module


def make_adapter(family, path: str, seed: int, alpha: int, in_subspace) -> str:
    """A PEFT LoRA on the aligned model: where ``in_subspace(weight)``, its lora_B spans
    the planted safety directions (a high cosine), elsewhere it is random (a low one)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(family.aligned, dtype=torch.float32)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=alpha, target_modules=list(TARGETS)))
    generator = torch.Generator().manual_seed(seed + 1)
    for name, module in peft_model.named_modules():
        if "default" not in getattr(module, "lora_A", {}):
            continue
        weight = name.removeprefix("base_model.model.") + ".weight"
        A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
        with torch.no_grad():
            A.copy_(0.1 * torch.randn(A.shape, generator=generator))
            if in_subspace(weight):
                B.copy_(0.3 * family.planted[weight].U[:, : B.shape[1]].float())
            else:
                B.copy_(0.05 * torch.randn(B.shape, generator=generator))
    peft_model.save_pretrained(path)
    return path


def ours(document: dict, out: str, root: str) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_lox  # noqa: F401 - registration

    options = MergeOptions(quiet=True, lora_merge_cache=os.path.join(root, "lora-cache"))
    run_merge(MergeConfiguration.model_validate(document), out, options=options)
    return {name: tensor.double() for name, tensor in load_state_dict(out).items()}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / max(float(b.double().norm()), 1e-30))


def lora_modules(family) -> list:
    """The LoRA-targeted weights in model order (the order the authors' loops pair them in)."""
    from transformers import LlamaForCausalLM

    order = LlamaForCausalLM.from_pretrained(family.aligned, dtype=torch.float32).state_dict()
    return [name for name in order if name.endswith(".weight") and any(t in name for t in TARGETS)]


def our_cosine(name, tuned, aligned, base) -> float:
    from mergekit_lox.methods.safelora import projection_cosine

    cos, _, _ = projection_cosine(tuned[name].float(), aligned[name].float(), base[name].float())
    return float(cos)


def print_rows(header, rows) -> None:
    print(header)
    for row in rows:
        print("  ".join(number(v) if isinstance(v, float) else f"{v!s:>10}" for v in row))


def number(value: float) -> str:
    """Cosines to the authors' 5 decimals; small distances in scientific notation."""
    return f"{value:>10.5f}" if value == 0 or abs(value) >= 1e-2 else f"{value:>10.2e}"


# --------------------------------------------------------------------------- LoX


def check_lox(code: str, root: str, alpha: float, rank: int) -> None:
    """VITA-Group/LoX safety/LoX.py (bfloat16 in and out, as the script loads) against
    ``lox_extrapolate`` on the same bfloat16 checkpoints, and both against float64."""
    family = build_family(root, FamilySpec(), dtype=torch.bfloat16)
    theirs_dir = os.path.join(root, "theirs")
    script = os.path.join(code, "safety", "LoX.py")
    command = [sys.executable, script, "--model", family.aligned, "--base-model", family.base]
    command += ["--k", str(rank), "--coef", str(alpha), "--save-path", theirs_dir]
    subprocess.run(command, check=True, capture_output=True)
    theirs = {n: t.double() for n, t in load_state_dict(theirs_dir).items()}
    document = {
        "merge_method": "lox_extrapolate",
        "base_model": family.base,
        "models": [{"model": family.aligned}],
        "parameters": {"alpha": alpha, "rank": rank},
        "dtype": "bfloat16",
    }
    mine = ours(document, os.path.join(root, "ours"), root)
    base, aligned = load_state_dict(family.base), load_state_dict(family.aligned)
    rows = []
    for name in sorted(mine):
        W_a, W_b = aligned[name].double(), base[name].double()
        if W_a.ndim < 2:
            exact = W_a
        else:
            U, S, Vh = torch.linalg.svd(W_a - W_b, full_matrices=False)
            exact = W_a + alpha * (U[:, :rank] * S[:rank]) @ Vh[:rank]
        rows.append(
            (name[-34:], relative(mine[name], theirs[name]), relative(mine[name], exact), relative(theirs[name], exact))
        )
    print(f"LoX alpha {alpha}, rank {rank}, bfloat16 checkpoints; relative Frobenius distances")
    print_rows(f"{'tensor':>34}  ours-theirs  ours-f64  theirs-f64", rows)
    print("max:", [max(r[i] for r in rows) for i in (1, 2, 3)])


# --------------------------------------------------------------------------- Safe LoRA


def check_safelora(code: str, root: str, threshold: float) -> None:
    """IBM/SafeLoRA model.py (threshold mode, on the PEFT model) against
    ``safelora_project`` on ``aligned+adapter``."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    family = build_family(root, FamilySpec())
    adapter = make_adapter(family, os.path.join(root, "ft"), 7, 8, lambda w: "q_proj" in w or "layers.1.mlp" in w)
    model_module = authors_module(os.path.join(code, "model.py"), "ibm_safelora_model")
    config_module = authors_module(os.path.join(code, "config.py"), "ibm_safelora_config")
    config = config_module.SafeLoRAConfig(
        base_model_path=family.base,
        aligned_model_path=family.aligned,
        select_layers_type="threshold",
        threshold=threshold,
        devices="cpu",
    )
    peft_model = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(family.aligned, dtype=torch.float32), adapter
    )
    safelora = model_module.SafeLoRA(peft_model, config)
    _, cosines = safelora.projected_weighted(safelora.get_aligned_matrix(), threshold)
    theirs = {n: t.detach().double() for n, t in safelora.model.merge_and_unload().state_dict().items()}
    document = {
        "merge_method": "safelora_project",
        "base_model": family.base,
        "models": [
            {"model": family.aligned, "parameters": {"role": "aligned"}},
            {"model": f"{family.aligned}+{adapter}", "parameters": {"role": "finetuned"}},
        ],
        "parameters": {"threshold": threshold},
        "dtype": "float32",
    }
    mine = ours(document, os.path.join(root, "ours"), root)
    base, aligned = load_state_dict(family.base), load_state_dict(family.aligned)
    folded = fold(aligned, adapter, RANK)
    rows = []
    for name, their_cos in zip(lora_modules(family), cosines, strict=True):
        cos = our_cosine(name, folded, aligned, base)
        rows.append(
            (name[-34:], their_cos, cos, their_cos <= threshold, cos <= threshold, relative(mine[name], theirs[name]))
        )
    others = max(relative(mine[n], theirs[n]) for n in mine if n not in set(lora_modules(family)))
    print(f"Safe LoRA threshold {threshold} (scaled projection)")
    print_rows(f"{'tensor':>34}  their cos  our cos  theirs  ours  ours-theirs", rows)
    print("max |cos difference|:", max(abs(r[1] - r[2]) for r in rows), " other tensors, max ours-theirs:", others)


def fold(aligned: dict, adapter: str, rank: int) -> dict:
    """W_a + s B A for every LoRA pair of ``adapter`` (float64), s = lora_alpha / r."""
    import json

    from safetensors.torch import load_file

    with open(os.path.join(adapter, "adapter_config.json")) as f:
        scaling = json.load(f)["lora_alpha"] / rank
    weights = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    out = {n: t.double() for n, t in aligned.items()}
    for key, A in weights.items():
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")].removeprefix("base_model.model.") + ".weight"
            B = weights[key.replace("lora_A", "lora_B")]
            out[name] = out[name] + scaling * (B.double() @ A.double())
    return out


# --------------------------------------------------------------------------- SafeMERGE


def check_safemerge(code: str, root: str, threshold: float, ratio: float) -> None:
    """aladinD/SafeMERGE utils.py (SafeLoRAMerger, as get_safemerge_model.py drives it)
    against ``safemerge`` on ``aligned+adapter`` inputs. The last columns: our result
    against theirs, and theirs against the transcription of their factor-wise merge
    (PEFT's `linear` combination of the LoRA factors, cross terms included)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    family = build_family(root, FamilySpec())
    finetuned = make_adapter(family, os.path.join(root, "ft"), 7, 8, lambda w: "q_proj" in w or "layers.1.mlp" in w)
    safety = make_adapter(family, os.path.join(root, "safe"), 21, 16, lambda w: False)
    authors = authors_module(os.path.join(code, "utils.py"), "safemerge_utils")
    recorded = []
    original = authors.compute_safelora_cos

    def recording(P, A, B, device="cuda"):
        recorded.append(original(P, A, B, device=device))
        return recorded[-1]

    authors.compute_safelora_cos = recording
    model = LlamaForCausalLM.from_pretrained(family.aligned, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, finetuned, adapter_name="finetuned")
    peft_model.load_adapter(safety, adapter_name="safe")
    merger = authors.SafeLoRAMerger(
        peft_model, family.base, family.aligned, threshold=threshold, default_merge_ratio=ratio, device="cpu"
    )
    merger.add_weighted_adapter_safelora(
        ["finetuned", "safe"], [1 - ratio, ratio], "weighted", combination_type="linear"
    )
    peft_model.set_adapter("weighted")
    peft_model.delete_adapter("finetuned")
    peft_model.delete_adapter("safe")
    theirs = {n: t.detach().double() for n, t in peft_model.merge_and_unload().state_dict().items()}
    document = {
        "merge_method": "safemerge",
        "base_model": family.base,
        "models": [
            {"model": family.aligned, "parameters": {"role": "aligned"}},
            {"model": f"{family.aligned}+{finetuned}", "parameters": {"role": "finetuned"}},
            {"model": f"{family.aligned}+{safety}", "parameters": {"role": "safety"}},
        ],
        "parameters": {"threshold": threshold, "safety_weight": ratio},
        "dtype": "float32",
    }
    mine = ours(document, os.path.join(root, "ours"), root)
    base, aligned = load_state_dict(family.base), load_state_dict(family.aligned)
    tuned = fold(aligned, finetuned, RANK)
    f_weights = load_file(os.path.join(finetuned, "adapter_model.safetensors"))
    s_weights = load_file(os.path.join(safety, "adapter_model.safetensors"))
    s_f, s_s = 8 / RANK, 16 / RANK
    rows = []
    for name, their_cos in zip(lora_modules(family), recorded, strict=True):
        key = "base_model.model." + name.removesuffix(".weight")
        A_f, B_f = (f_weights[f"{key}.lora_{x}.weight"].double() for x in "AB")
        A_s, B_s = (s_weights[f"{key}.lora_{x}.weight"].double() for x in "AB")
        cos = our_cosine(name, tuned, aligned, base)
        w_f, w_s = (1 - ratio, ratio) if their_cos < threshold else (1.0, 0.0)
        factor_wise = (math.sqrt(w_f * s_f) * B_f + math.sqrt(w_s * s_s) * B_s) @ (
            math.sqrt(w_f * s_f) * A_f + math.sqrt(w_s * s_s) * A_s
        )
        update = theirs[name] - aligned[name].double()
        rows.append(
            (
                name[-34:],
                their_cos,
                cos,
                their_cos < threshold,
                cos < threshold,
                relative(mine[name] - aligned[name].double(), update),
                relative(theirs[name], aligned[name].double() + factor_wise),
            )
        )
    others = max(relative(mine[n], theirs[n]) for n in mine if n not in set(lora_modules(family)))
    print(f"SafeMERGE threshold {threshold}, safety weight {ratio}")
    print_rows(f"{'tensor':>34}  their cos  our cos  theirs  ours  ours-theirs(update)  theirs-transcription", rows)
    print("max |cos difference|:", max(abs(r[1] - r[2]) for r in rows), " other tensors, max ours-theirs:", others)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=("lox", "safelora", "safemerge"))
    parser.add_argument("--code", required=True, help="a checkout of the authors' repository")
    parser.add_argument("--threshold", type=float, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="crosscheck-") as root:
        if args.method == "lox":
            check_lox(args.code, root, alpha=1.25, rank=6)
        elif args.method == "safelora":
            check_safelora(args.code, root, 0.5 if args.threshold is None else args.threshold)
        else:
            check_safemerge(args.code, root, 0.35 if args.threshold is None else args.threshold, ratio=0.2)


if __name__ == "__main__":
    main()
