"""The `mergekit-lox` command line (typer)."""

from __future__ import annotations

import enum
import json
import sys
import traceback
from typing import List, Optional

import click
import typer

from mergekit_lox.errors import one_line
from mergekit_lox.run import default_mergekit_args, run_recipe

app = typer.Typer(
    name="mergekit-lox",
    help="Safety-subspace weight surgery (LoX, LSSF, Safe LoRA, SafeMERGE) as mergekit merge methods.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}

# The parsed root options, for main()'s error handler (set by _root).
_ROOT_OPTIONS = {"verbose": False}


def _as_recipe_parameter(method: str, parameter: str, option: str):
    """A typer callback: the option's value checked by the recipe parameter it mirrors
    (methods/describe.option_value, one rule for both); a usage error otherwise."""

    def check(value):
        if value is None:
            return value
        from mergekit_lox.methods.describe import option_value

        try:
            return option_value(method, parameter, value, option)
        except ValueError as error:
            raise typer.BadParameter(str(error).removeprefix(f"{option} ")) from None

    return check


def _finite(value):
    """A typer callback for a float option: nan and inf are usage errors (click's
    ranges let them through)."""
    import math

    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value!r} is not a finite number")
    return value


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", help="Show tracebacks on errors."),
):
    """Safety-subspace weight surgery as native mergekit merge methods."""
    _ROOT_OPTIONS["verbose"] = verbose


@app.command()
def methods(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """List the project's merge methods: parameters, types, defaults, paper."""
    from mergekit_lox.methods.describe import describe_methods

    described = describe_methods()
    if as_json:
        typer.echo(json.dumps(described, indent=2))
        return
    for method in described:
        typer.echo(f"{method['name']}: {method['pretty_name']} ({method['paper']})")
        roles = ", ".join(method["roles"])
        typer.echo(f"  inputs: base_model + model(s) with role {roles}")
        if method.get("adapter"):
            typer.echo("  adapter: its term can be written as a PEFT LoRA adapter (`mergekit-lox adapter`)")
        for p in method["parameters"]:
            typer.echo(f"  {p['name']:<13} {p['type']:<34} default {p['default']!r}  [{p['scope']}]")
    typer.echo("Fidelity to each paper and its reference code, and the test that holds it: docs/fidelity.md")


@app.command(context_settings=_PASSTHROUGH)
def run(
    ctx: typer.Context,
    recipe: str = typer.Argument(..., help="YAML recipe."),
    out: str = typer.Argument(..., help="Output model directory."),
    intermediate_dir: Optional[str] = typer.Option(
        None,
        "--intermediate-dir",
        "-I",
        help="Chains only: where named documents are written (default: OUT.intermediate beside OUT).",
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Refuse a merge that changes nothing (every weight matrix equal to its input)."
    ),
):
    """Run a recipe like `mergekit-yaml`, or a multi-document recipe (a chain) like
    `mergekit-multi`; any other option goes to mergekit (--cuda, --device,
    --lazy-unpickle, --out-shard-size, --no-copy-tokenizer, --no-lazy for chains, ...;
    see `mergekit-yaml --help`)."""
    run_recipe(recipe, out, [*ctx.args, *default_mergekit_args(out, list(ctx.args))], intermediate_dir, strict=strict)


@app.command()
def check(
    recipe: str = typer.Argument(..., help="YAML recipe (one document, or a multi-document chain), or a sweep file."),
    strict: bool = typer.Option(
        False, "--strict", help="A document that would change nothing (aligned = base, alpha 0, ...) is an error."
    ),
):
    """Validate a recipe without computing anything: YAML, mergekit's schema, methods,
    parameter names and types, roles, base model, local paths, chain references and cycles.
    A sweep file (`recipe:` with `grid:` or `points:`) is validated too: its recipe, every
    parameter address and value, the eval options.
    Exit 0 when valid; otherwise one `error:` line per problem, naming document and field."""
    from mergekit_lox.sweep import check_file

    report, ok_line = check_file(recipe)
    if strict:
        report.strict()
    errors, notes = report.lines()
    for line in notes:
        typer.echo(line)
    for line in errors:
        typer.echo(line, err=True)
    if errors:
        raise typer.Exit(1)
    typer.echo(ok_line)


@app.command()
def demo(
    directory: str = typer.Argument("mergekit-lox-demo", help="Where to build the demo."),
    behaviour: bool = typer.Option(
        True,
        "--behaviour/--no-behaviour",
        help="Also train a tiny model on a synthetic request language and measure refusal with eval "
        "(DIR/behaviour; under a minute on 2 cores). --no-behaviour: the weight-level demo only.",
    ),
):
    """Build small local models with a planted safety subspace and run the demo chain;
    then the behavioural testbed (docs/eval.md)."""
    from mergekit_lox.demo import run_demo

    run_demo(directory, lambda recipe, out: run_recipe(recipe, out, ["--quiet"]), echo=typer.echo, behaviour=behaviour)


@app.command()
def analyze(
    base: str = typer.Option(..., "--base", help="Pre-alignment model (W_b): directory or Hugging Face id."),
    aligned: str = typer.Option(..., "--aligned", help="Safety-aligned model (W_a): directory or id."),
    finetuned: Optional[str] = typer.Option(
        None, "--finetuned", help="Fine-tuned model (W_f): adds r_ft and the Safe LoRA / SafeMERGE cosine."
    ),
    out: str = typer.Option(..., "-o", "--out", help="Where to write analysis.json, analysis.csv, report.html."),
    k: int = typer.Option(6, "--k", min=1, help="Safety-subspace rank for energy_top_k, r_align, r_ft."),
    name_filter: Optional[str] = typer.Option(None, "--filter", help="Only tensors whose name contains this."),
    device: str = typer.Option("cpu", "--device", help="Device for the math (cpu, cuda, cuda:1, ...)."),
):
    """Per-tensor safety-subspace report: spectra, effective ranks, LoX's r_align/r_ft,
    Safe LoRA cosines (what safelora_project would project and safemerge would merge).
    Streams the models one tensor at a time."""
    from mergekit_lox.analyze import run_analysis

    paths = run_analysis(base, aligned, out, finetuned, k=k, name_filter=name_filter, device=device, progress=True)
    typer.echo(f"wrote {paths['json']} and {paths['csv']}")
    typer.echo(f"report: {paths['html']}")


@app.command("eval")
def eval_models(
    models: List[str] = typer.Argument(..., help="Model directories or Hugging Face ids, compared side by side."),
    safety: str = typer.Option(
        ...,
        "--safety",
        help="Harmful prompts: a bundled benchmark (advbench, harmbench[:val], strongreject, catqa, harmfulqa, "
        "xstest; see `mergekit-lox benchmarks`), a .jsonl/.json/.csv/.parquet/.txt file, saved dataset or dataset id.",
    ),
    column: Optional[str] = typer.Option(None, "--column", help="Prompt column (default: prompt, goal, Goal, ...)."),
    split: str = typer.Option("train", "--split", help="Dataset split (datasets only)."),
    limit: Optional[int] = typer.Option(
        None, "--limit", min=1, help="N prompts: the first N of a file; a fixed sample (--seed) of a benchmark."
    ),
    over_refusal: Optional[str] = typer.Option(
        None, "--over-refusal", help="xstest: also answer XSTest's 250 safe prompts and report the over-refusal rate."
    ),
    utility: Optional[str] = typer.Option(None, "--utility", help="Text file or dataset for perplexity."),
    utility_column: Optional[str] = typer.Option(None, "--utility-column", help="Text column of --utility."),
    utility_split: str = typer.Option("train", "--utility-split", help="Split of a --utility dataset."),
    lm_eval_tasks: Optional[str] = typer.Option(
        None,
        "--lm-eval-tasks",
        help="Comma-separated lm-evaluation-harness tasks (needs the extra: pip install mergekit-lox\\[eval]).",
    ),
    judge: str = typer.Option(
        "rules",
        "--judge",
        help="'rules' (default: refusal openings and declines), 'keyword' (the papers' GCG markers), 'xstest' "
        "(XSTest's string match), harmbench:M / wildguard:M / strongreject:M / qi-harmfulness:M (the field's "
        "judges), or a guard model / classifier path or id.",
    ),
    judge_url: Optional[str] = typer.Option(
        None, "--judge-url", help="OpenAI-compatible endpoint for a NAME:MODEL judge (key: MERGEKIT_LOX_JUDGE_KEY)."
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Answer length, tokens (greedy)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Prompts per generation batch."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ... (vLLM is used on CUDA if installed)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Answer cache (default: OUT/cache)."),
    as_json: bool = typer.Option(False, "--json", help="Print eval.json to stdout (messages go to stderr)."),
    out: str = typer.Option(..., "-o", "--out", help="Where to write eval.json, answers.jsonl, report.html."),
):
    """Refusal rate / attack success rate (Wilson 95% intervals) and utility of models; see docs/eval.md."""
    from mergekit_lox.evaluate import run_eval

    tasks = [t.strip() for t in lm_eval_tasks.split(",") if t.strip()] if lm_eval_tasks else None
    echo = (lambda line: typer.echo(line, err=True)) if as_json else typer.echo
    report = run_eval(
        models, out, safety=safety, column=column, split=split, limit=limit, utility=utility,
        utility_column=utility_column, lm_eval_tasks=tasks, judge=judge, max_new_tokens=max_new_tokens,
        batch_size=batch_size, device=device, seed=seed, echo=echo, cache_dir=cache_dir, utility_split=utility_split,
        over_refusal=over_refusal, judge_url=judge_url,
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    for result in report["models"]:
        s = result["safety"]
        lo, hi = s["ci95"]
        echo(f"{result['model']}: refused {s['refused']}/{s['n']} = {s['refusal_rate']:.1%} (95% CI {lo:.1%}-{hi:.1%})")
        over = result.get("over_refusal")
        if over:
            lo, hi = over["ci95"]
            echo(
                f"  over-refusal on {over['benchmark']}: {over['over_refusal_rate']:.1%} of {over['n']} "
                f"(95% CI {lo:.1%}-{hi:.1%})"
            )
    echo(f"wrote {out}/eval.json, {out}/answers.jsonl; report: {out}/report.html")


@app.command("safelora-select")
def safelora_select(
    recipe: str = typer.Argument(..., help="A one-document safelora_project recipe."),
    num_layers: int = typer.Option(..., "--num-layers", min=1, help="Project the N tensors with the lowest cosine."),
    out: str = typer.Option(..., "-o", "--out", help="Where to write the recipe with the equivalent threshold."),
    lora_merge_cache: Optional[str] = typer.Option(
        None,
        "--lora-merge-cache",
        help="Where `aligned+adapter` models are merged (default: OUT.lora-cache beside OUT).",
    ),
    device: str = typer.Option("cpu", "--device", help="Device for the cosines (cpu, cuda, ...)."),
):
    """Safe LoRA's number mode: write the recipe with threshold = the N-th lowest cosine.

    Streams the recipe's models tensor by tensor through mergekit's planner and
    loaders, computes every tensor's cosine, prints the tensors it selects."""
    from mergekit_lox.safelora_tools import safelora_select as select

    select(recipe, num_layers, out, lora_merge_cache=lora_merge_cache, device=device, echo=typer.echo)


class SvdChoice(str, enum.Enum):
    auto = "auto"
    exact = "exact"
    randomized = "randomized"


class SafeLoRAProjection(str, enum.Enum):
    scaled = "scaled"
    orthogonal = "orthogonal"


@app.command("safelora-adapter")
def safelora_adapter(
    base: str = typer.Option(..., "--base", help="Pre-alignment model directory (W_b)."),
    aligned: str = typer.Option(..., "--aligned", help="Aligned model the adapter was trained on (W_a)."),
    adapter: str = typer.Option(..., "--adapter", help="PEFT LoRA adapter directory (safetensors)."),
    out: str = typer.Option(..., "-o", "--out", help="Output PEFT adapter directory."),
    threshold: Optional[float] = typer.Option(
        None,
        "--threshold",
        callback=_as_recipe_parameter("safelora_project", "threshold", "--threshold"),
        help="Project modules with cosine <= T (default 0.5 unless --num-layers is given).",
    ),
    num_layers: Optional[int] = typer.Option(
        None, "--num-layers", min=1, help="Project the N modules with the lowest cosine."
    ),
    projection: SafeLoRAProjection = typer.Option(
        SafeLoRAProjection.scaled, "--projection", help="C = V Vᵀ/||V||_F (scaled) or U_k U_kᵀ (orthogonal)."
    ),
    rank: int = typer.Option(
        8,
        "--rank",
        callback=_as_recipe_parameter("safelora_project", "rank", "--rank"),
        help="k for --projection orthogonal.",
    ),
    svd: SvdChoice = typer.Option(
        SvdChoice.auto,
        "--svd",
        help="How --projection orthogonal finds U_k, as safelora_project's `svd` parameter (docs/performance.md).",
    ),
    device: str = typer.Option("cpu", "--device", help="Device for the projections (cpu, cuda, ...)."),
):
    """Project a PEFT LoRA adapter with Safe LoRA and write a PEFT adapter (B' = C B)."""
    from mergekit_lox.safelora_tools import safelora_adapter as project_adapter

    if threshold is not None and num_layers is not None:
        raise click.UsageError("give --threshold or --num-layers, not both")
    project_adapter(
        base,
        aligned,
        adapter,
        out,
        threshold=threshold,
        num_layers=num_layers,
        projection=projection.value,
        rank=rank,
        svd=svd.value,
        device=device,
        echo=typer.echo,
    )


@app.command("adapter")
def adapter(
    recipe: str = typer.Argument(..., help="A lox_extrapolate or lssf_fusion recipe, or a chain ending in one."),
    out: str = typer.Option(..., "-o", "--out", help="Output PEFT LoRA adapter directory."),
    max_rank: Optional[int] = typer.Option(
        None, "--max-rank", min=1, help="Cap each module's rank (best approximation; the distance is printed)."
    ),
    require_complete: bool = typer.Option(
        False, "--require-complete", help="Fail if any weight's term cannot be carried (3-D, tied, no module)."
    ),
    embeddings: bool = typer.Option(
        True, "--embeddings/--no-embeddings", help="Write embedding LoRA for nn.Embedding weights (default: yes)."
    ),
    intermediate_dir: Optional[str] = typer.Option(
        None, "--intermediate-dir", "-I", help="Chains: where `mergekit-lox run` wrote the stages (OUT.intermediate)."
    ),
    lora_merge_cache: Optional[str] = typer.Option(
        None, "--lora-merge-cache", help="Where `model+adapter` inputs are merged (default: OUT.lora-cache)."
    ),
    device: str = typer.Option("cpu", "--device", help="Device for the decompositions (cpu, cuda, ...)."),
):
    """Write the low-rank term of a LoX or LSSF recipe as a PEFT LoRA adapter for the model
    it is added to (LoX: the aligned model; LSSF: the fine-tuned one). Merged by PEFT, the
    adapter reproduces the recipe's merge; weights it cannot carry are listed with the
    distance their absence makes. Details: docs/adapters.md."""
    from mergekit_lox.adapters import write_recipe_adapter

    write_recipe_adapter(
        recipe,
        out,
        max_rank=max_rank,
        require_complete=require_complete,
        embeddings=embeddings,
        intermediate_dir=intermediate_dir,
        lora_merge_cache=lora_merge_cache,
        device=device,
        echo=typer.echo,
    )


class SweepExecutor(str, enum.Enum):
    local = "local"
    ray = "ray"


@app.command()
def sweep(
    sweep_file: str = typer.Argument(..., help="Sweep file (YAML): recipe, grid or points, eval, keep."),
    out: str = typer.Option(..., "-o", "--out", help="Where to write points/, sweep.json, sweep.csv, report.html."),
    executor: SweepExecutor = typer.Option(
        SweepExecutor.local, "--executor", help="local: one point after another here; ray: one Ray task per point."
    ),
    ray_address: Optional[str] = typer.Option(
        None,
        "--ray-address",
        help="Ray cluster to join (auto, HOST:PORT, ray://...); default: a new local Ray instance.",
    ),
    gpus_per_point: Optional[float] = typer.Option(
        None,
        "--gpus-per-point",
        min=0,
        callback=_finite,
        help="Ray: GPUs per point (default: 1 when eval or merge uses CUDA, else 0).",
    ),
    cpus_per_point: float = typer.Option(1.0, "--cpus-per-point", min=0, callback=_finite, help="Ray: CPUs per point."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run points recorded as failed again."),
    trust_remote_code: bool = typer.Option(
        False,
        "--trust-remote-code",
        help="Pass --trust-remote-code to every merge (runs Python code from the models' folders); "
        "a sweep file cannot ask for it.",
    ),
):
    """Merge and evaluate a recipe at every point of a parameter grid; report the
    safety-versus-utility trade-off and the chosen point. A staged sweep (defend:,
    attack:, repair:) defends, attacks, repairs and evaluates each point, attacks the
    undefended model as the baseline, and chooses on the worst case over the attacks
    (docs/sweep.md). Resumable: rerun the same command and recorded points are skipped."""
    from mergekit_lox.sweep import run_sweep

    if executor is SweepExecutor.local and (ray_address or gpus_per_point is not None):
        raise click.UsageError("--ray-address and --gpus-per-point need --executor ray")
    state = run_sweep(
        sweep_file,
        out,
        executor=executor.value,
        ray_address=ray_address,
        gpus_per_point=gpus_per_point,
        cpus_per_point=cpus_per_point,
        retry_failed=retry_failed,
        trust_remote_code=trust_remote_code,
        echo=typer.echo,
    )
    ok = sum(1 for p in state["points"] if p["status"] == "ok")
    typer.echo(f"{ok} of {len(state['points'])} point(s) ok; chosen: point {state['chosen']} ({state['rule']['why']})")
    typer.echo(f"wrote {out}/sweep.json and sweep.csv; report: {out}/report.html")


class CalibrationNormalization(str, enum.Enum):
    token = "token"
    none = "none"


@app.command("lssf-calibrate")
def lssf_calibrate(
    aligned: str = typer.Option(..., "--aligned", help="The aligned model (W_a): directory or Hugging Face id."),
    prompts: str = typer.Option(
        ..., "--prompts", help="Harmful queries: .jsonl/.json/.csv/.txt file, saved dataset or dataset id."
    ),
    out: str = typer.Option(..., "-o", "--out", help="Subspace directory to write (lssf_fusion's `subspace:`)."),
    samples: int = typer.Option(128, "--samples", min=1, help="Use the first N queries (the paper: 128)."),
    max_rank: int = typer.Option(256, "--max-rank", min=1, help="Singular vectors stored per weight."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Sequences per forward / generation batch."),
    column: Optional[str] = typer.Option(None, "--column", help="Query column (default: prompt, goal, Goal, ...)."),
    response_column: Optional[str] = typer.Option(
        None, "--response-column", help="Use this column's responses instead of generating the aligned model's own."
    ),
    split: str = typer.Option("train", "--split", help="Dataset split (datasets only)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Length of generated responses."),
    normalization: CalibrationNormalization = typer.Option(
        CalibrationNormalization.token, "--normalization", help="X^: each token scaled to unit norm, or none."
    ),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Model dtype (default: float32 on CPU, own on GPU)."),
):
    """LSSF's calibrated subspace (the paper's Eq. 4): SVD of the normalised activations
    Z = W X^ of every linear layer of the aligned model on harmful queries and its own
    responses, streamed through per-layer Grams. Details: docs/lssf.md."""
    from mergekit_lox.calibrate import calibrate, describe

    metadata = calibrate(
        aligned, prompts, out, samples=samples, max_rank=max_rank, device=device, dtype=dtype,
        batch_size=batch_size, column=column, response_column=response_column, split=split,
        normalization=normalization.value, max_new_tokens=max_new_tokens, progress=True, echo=typer.echo,
    )  # fmt: skip
    for line in describe(metadata):
        typer.echo(line)
    typer.echo(f"wrote {out}: use it with `subspace: {out}` in an lssf_fusion recipe")


@app.command("judge")
def judge_answers(
    answers: str = typer.Argument(..., help="answers.jsonl from eval, or a JSONL/CSV/parquet file of answers."),
    out: str = typer.Option(..., "-o", "--out", help="Folder for judged.jsonl and judge.json."),
    judge: str = typer.Option(
        "rules", "--judge", help="rules (default), keyword, xstest, NAME:MODEL (harmbench, wildguard, ...), a guard."
    ),
    judge_url: Optional[str] = typer.Option(
        None, "--judge-url", help="OpenAI-compatible endpoint for a NAME:MODEL judge (key: MERGEKIT_LOX_JUDGE_KEY)."
    ),
    label_column: Optional[str] = typer.Option(
        None, "--label-column", help="Human labels to measure the judge against (default: final_label or label)."
    ),
    prompt_column: Optional[str] = typer.Option(None, "--prompt-column", help="Default: prompt, question, goal, ..."),
    answer_column: Optional[str] = typer.Option(None, "--answer-column", help="Default: answer, completion, ..."),
    device: str = typer.Option("cpu", "--device", help="For a guard model: cpu, cuda, ..."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="For a guard model."),
):
    """Judge answers that already exist, without generating: every row with its verdict
    (refused, complied, unclear); with labels, the judge's agreement, refusal precision and
    recall, and the confusion table. Details: docs/eval.md."""
    from mergekit_lox.evaluate.judge_file import judge_file

    judge_file(
        answers, out, judge=judge, label_column=label_column, prompt_column=prompt_column,
        answer_column=answer_column, device=device, batch_size=batch_size, echo=typer.echo, judge_url=judge_url,
    )  # fmt: skip
    typer.echo(f"wrote {out}/judged.jsonl and {out}/judge.json")


@app.command("benchmarks")
def benchmarks(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """The bundled safety and over-refusal benchmarks (`eval --safety NAME[:split]`,
    `--over-refusal xstest`): prompts, licence, columns; origins in data/bundled/NOTICE.md."""
    from mergekit_lox.data.benchmarks import describe

    rows = describe()
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    for row in rows:
        typer.echo(
            f"{row['name']:<20} {row['prompts']:>5} prompts  {row['kind']:<12} {row['licence']:<11} "
            f"{row['description']}"
        )
        typer.echo(f"{'':<20} files: {', '.join(row['files'])}; columns: {row['columns']}")


@app.command("attack")
def attack(
    model: Optional[str] = typer.Argument(None, help="The model to attack: directory or Hugging Face id."),
    data: Optional[str] = typer.Option(
        None, "--data", help="(prompt, answer) pairs: .jsonl/.json/.csv/.parquet file, saved dataset or dataset id."
    ),
    out: Optional[str] = typer.Option(None, "-o", "--out", help="Output folder (model/, adapter/, attack.json)."),
    lora: Optional[int] = typer.Option(
        None, "--lora", help="LoRA rank: write a PEFT adapter (PEFT's default modules)."
    ),
    target_modules: Optional[str] = typer.Option(
        None,
        "--target-modules",
        help="LoRA modules, comma-separated (q_proj,v_proj), or all-linear. Default: PEFT's for the model type.",
    ),
    full: bool = typer.Option(False, "--full", help="Full fine-tune: write a whole model."),
    preset: Optional[str] = typer.Option(
        None, "--preset", help="A paper's attack (see --presets): fills unset options."
    ),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Epochs (default: the preset's, else 1)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default: the preset's, else 2e-5)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N optimiser steps."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Examples per step (default 8)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data order and the LoRA initialisation."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    prompt_column: Optional[str] = typer.Option(None, "--prompt-column", help="Default: prompt, question, goal, ..."),
    answer_column: Optional[str] = typer.Option(None, "--answer-column", help="Default: answer, response, target, ..."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Train on the first N examples."),
    split: str = typer.Option("train", "--split", help="Dataset split (datasets only)."),
    presets: bool = typer.Option(False, "--presets", help="List the presets with their settings and sources."),
):
    """A fine-tuning attack (transformers Trainer, PEFT for --lora): loss on the answer only,
    the chat template applied where the model has one. OUT/attack.json records the data's
    sha256, the settings and the loss curve; a finished attack is never run twice.
    Details: docs/attack.md."""
    from mergekit_lox.attack import PRESETS, AttackSettings, run_attack

    if presets:
        for name, p in PRESETS.items():
            how = f"LoRA rank {p.lora}" if p.lora else "full"
            typer.echo(f"{name}: {p.description} [{how}; data: {p.data or 'bring your own (--data)'}] ({p.source})")
        return
    if model is None or out is None:
        raise typer.BadParameter("MODEL and -o OUT are required (or --presets)")
    targets = tuple(m.strip() for m in target_modules.split(",") if m.strip()) if target_modules else None
    settings = AttackSettings(
        data=data, lora=lora, target_modules=targets, full=full, preset=preset, epochs=epochs, lr=lr,
        max_steps=max_steps,
        batch_size=batch_size, seed=seed, device=device, prompt_column=prompt_column, answer_column=answer_column,
        limit=limit, split=split,
    )  # fmt: skip
    run_attack(model, settings, out, verbose=_ROOT_OPTIONS["verbose"], echo=typer.echo)


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point: usage errors exit 2, every other failure one `error:` line and 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _ROOT_OPTIONS["verbose"] = False
    # typer vendors its own copy of click, while mergekit's commands (which `run`
    # delegates to) raise the real click's exceptions: handle both families.
    try:
        result = app(args=argv, prog_name="mergekit-lox", standalone_mode=False)
    except (click.exceptions.Exit, typer.Exit) as exit_:
        sys.exit(exit_.exit_code)
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        sys.exit(1)
    except Exception as error:  # noqa: BLE001 - the CLI's last line of defence
        if hasattr(error, "show") and hasattr(error, "exit_code"):  # a click usage error
            error.show()
            sys.exit(error.exit_code)
        if _ROOT_OPTIONS["verbose"]:
            traceback.print_exc()
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(1)
    if result == 130:  # typer's answer to a KeyboardInterrupt outside mergekit's commands
        print("error: interrupted", file=sys.stderr)
        sys.exit(1)
    if isinstance(result, int) and result:
        sys.exit(result)


if __name__ == "__main__":
    main()
