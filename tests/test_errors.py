"""Bad input: one `error:` line that says what to fix, exit status 1, no traceback.

Every case starts from a valid recipe on the local fixture family and breaks one
thing. Configuration errors must stop `mergekit-lox run` before mergekit starts
(its `run_merge` is never called, so no hub lookup, no tensor), and plain
mergekit must raise the same errors while it plans, before any tensor is loaded.
Errors in the weights themselves (NaN/Inf, vocabulary, shapes, an adapter that
does not fit) must name the tensor, model or adapter at fault.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml
from conftest import run_cli
from safetensors.torch import load_file, save_file

from mergekit_lox.demo.synthetic import load_state_dict, make_tokenizer


def write(path, text_or_document) -> str:
    with open(path, "w", encoding="utf-8") as f:
        if isinstance(text_or_document, str):
            f.write(text_or_document)
        else:
            yaml.safe_dump(text_or_document, f, sort_keys=False)
    return str(path)


def lox(family, aligned=None, **parameters) -> dict:
    return {
        "merge_method": "lox_extrapolate",
        "base_model": family.base,
        "models": [{"model": aligned or family.aligned, "parameters": {"role": "aligned"}}],
        "parameters": {"alpha": 1.25, "rank": 4, **parameters},
        "dtype": "float32",
    }


def realign(family, method="lssf_fusion", aligned=None, finetuned=None, roles=("aligned", "finetuned"), **parameters):
    models = [
        {"model": aligned or family.aligned, "parameters": {"role": roles[0]}},
        {"model": finetuned or family.finetuned, "parameters": {"role": roles[1]}},
    ]
    for model in models:
        if model["parameters"]["role"] is None:
            del model["parameters"]
    return {
        "merge_method": method,
        "base_model": family.base,
        "models": models,
        "parameters": parameters,
        "dtype": "float32",
    }


@pytest.fixture
def mergekit_never_runs(monkeypatch):
    """Records every call of mergekit-yaml's run_merge: a config error must come first."""
    import mergekit.scripts.run_yaml

    calls = []
    monkeypatch.setattr(mergekit.scripts.run_yaml, "run_merge", lambda *a, **k: calls.append(a))
    return calls


def assert_error_line(code, err, *fragments):
    lines = err.strip().splitlines()
    assert code == 1, err
    assert lines and lines[-1].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[-1], f"{fragment!r} not in {lines[-1]!r}"
    return lines[-1]


# --------------------------------------------------------------------------- configuration


def _config_cases(family):
    """(id, recipe document or raw text, fragments the error line must contain)."""
    no_base = lox(family)
    del no_base["base_model"]
    one_model = realign(family)
    one_model["models"] = one_model["models"][:1]
    three_models = lox(family)
    three_models["models"].append({"model": family.finetuned, "parameters": {"role": "aligned"}})
    return [
        (
            "yaml-syntax",
            "merge_method: lox_extrapolate\nbase_model: [oops\n",
            ["document 1: line 3", "YAML syntax error"],
        ),
        (
            "unknown-method",
            dict(lox(family), merge_method="lox_extrapolat"),
            ["merge_method", "'lox_extrapolat'", "did you mean 'lox_extrapolate'"],
        ),
        ("unknown-parameter", lox(family, alhpa=2.0), ["parameters.alhpa", "did you mean 'alpha'"]),
        ("wrong-type", lox(family, alpha="big"), ["parameters.alpha", "'big' is not a valid float"]),
        ("negative-rank", lox(family, rank=-2), ["parameters.rank", "-2", ">= 0"]),
        ("nan-alpha", lox(family, alpha=float("nan")), ["parameters.alpha", "finite"]),
        (
            "inf-threshold",
            realign(family, "safelora_project", threshold=float("inf")),
            ["parameters.threshold", "finite"],
        ),
        ("missing-role", realign(family, roles=("aligned", None)), ["models", f"model {family.finetuned} has no role"]),
        ("duplicated-role", realign(family, roles=("aligned", "aligned")), ["role 'aligned' is given to both"]),
        (
            "misspelt-role",
            realign(family, roles=("aligned", "fintuned")),
            ["has role 'fintuned'", "expected one of aligned, finetuned"],
        ),
        (
            "one-model-for-lssf",
            one_model,
            ["models", "at least 2 non-base inputs", "lssf_fusion needs base_model plus exactly 2 model(s)"],
        ),
        (
            "two-models-for-lox",
            three_models,
            ["models", "exactly 1 non-base", "lox_extrapolate needs base_model plus exactly 1 model(s)"],
        ),
        ("missing-base", no_base, ["base_model", "lox_extrapolate requires a base_model"]),
        (
            "missing-path",
            lox(family, aligned=family.aligned + "-typo"),
            ["models[0].model", "does not exist", f"did you mean '{family.aligned}'"],
        ),
    ]


CONFIG_CASES = [
    "yaml-syntax",
    "unknown-method",
    "unknown-parameter",
    "wrong-type",
    "negative-rank",
    "nan-alpha",
    "inf-threshold",
    "missing-role",
    "duplicated-role",
    "misspelt-role",
    "one-model-for-lssf",
    "two-models-for-lox",
    "missing-base",
    "missing-path",
]


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_configuration_errors_stop_run_before_mergekit(family, tmp_path, capsys, mergekit_never_runs, case):
    _, document, fragments = next(c for c in _config_cases(family) if c[0] == case)
    recipe = write(tmp_path / "recipe.yml", document)
    out = tmp_path / "out"
    code, _, err = run_cli(["run", recipe, str(out), "--quiet"], capsys)
    assert_error_line(code, err, f"error: {recipe}: document 1", *fragments)
    assert len(err.strip().splitlines()) == 1
    assert mergekit_never_runs == []
    assert sorted(os.listdir(tmp_path)) == ["recipe.yml"]  # no OUT, no staging, no cache


def test_verbose_adds_the_traceback(family, tmp_path, capsys, mergekit_never_runs):
    recipe = write(tmp_path / "recipe.yml", lox(family, rank=-2))
    code, _, err = run_cli(["--verbose", "run", recipe, str(tmp_path / "out")], capsys)
    assert code == 1
    assert err.startswith("Traceback (most recent call last)")
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {recipe}: document 1: parameters.rank: -2")


def test_relative_path_under_a_local_model_folder_is_not_a_hub_id(
    family, tmp_path, capsys, monkeypatch, mergekit_never_runs
):
    """`models/alignd` looks like a Hugging Face ID (owner/name); when `models/`
    is a local folder of models it is a misspelt local path and fails at once
    instead of falling into a hub download."""
    document = lox(family)
    document["models"][0]["model"] = os.path.basename(family.root) + "/alignd"
    monkeypatch.chdir(os.path.dirname(family.root))
    recipe = write(tmp_path / "recipe.yml", document)
    code, _, err = run_cli(["run", recipe, str(tmp_path / "out")], capsys)
    root = os.path.basename(family.root)
    assert_error_line(
        code,
        err,
        f"{root}/alignd does not exist",
        "local path, not a Hugging Face ID",
        f"did you mean '{root}/aligned'",
    )
    assert mergekit_never_runs == []


@pytest.mark.parametrize(
    "case, match",
    [
        ("unknown-parameter", r"lox_extrapolate has no parameter 'alhpa' \(did you mean 'alpha'\?\)"),
        ("wrong-type", r"parameter alpha \(tensor [\w.]+\): 'big' is not a valid float \(finite\)"),
        ("negative-rank", r"parameter rank \(tensor [\w.]+\): -2 is not a valid int \(>= 0\)"),
        ("nan-alpha", r"parameter alpha \(tensor [\w.]+\): nan is not a valid float \(finite\)"),
        ("inf-threshold", r"parameter threshold \(tensor [\w.]+\): inf is not a valid float \(finite\)"),
        ("missing-role", r"has no role"),
        ("duplicated-role", r"role 'aligned' is given to both"),
        ("misspelt-role", r"has role 'fintuned', expected one of aligned, finetuned"),
        ("one-model-for-lssf", r"at least 2 non-base inputs .*; got 1: lssf_fusion needs base_model plus exactly 2"),
        ("two-models-for-lox", r"exactly 1 non-base inputs .*; got 2: lox_extrapolate needs base_model plus exactly 1"),
        ("missing-base", r"requires a base input .*: lox_extrapolate needs base_model"),
    ],
)
def test_plain_mergekit_yaml_raises_them_while_planning(family, tmp_path, monkeypatch, case, match):
    """mergekit-yaml's own command, in-process: the error comes before a single
    input tensor is loaded (GatherTensors never executes) and names the culprit."""
    from mergekit.io.tasks import GatherTensors
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    loaded = []
    monkeypatch.setattr(GatherTensors, "execute", lambda *a, **k: loaded.append(1))
    _, document, _ = next(c for c in _config_cases(family) if c[0] == case)
    recipe = write(tmp_path / "recipe.yml", document)
    with pytest.raises(Exception, match=match) as raised:
        mergekit_yaml.main(args=[recipe, str(tmp_path / "out"), "--quiet"], standalone_mode=False)
    assert loaded == []
    assert "\n" not in str(raised.value)
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


# --------------------------------------------------------------------------- the weights


def derived_model(source: str, path, edit, config_changes=None, vocab_size=None) -> str:
    """A copy of a model directory with its tensors edited in place."""
    shutil.copytree(source, path)
    state = load_state_dict(str(path))
    edit(state)
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if config_changes:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        config.update(config_changes)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
    if vocab_size:
        make_tokenizer(vocab_size).save_pretrained(str(path))
    return str(path)


NAN_TENSOR = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def poisoned(family, tmp_path_factory):
    """Copies of aligned and finetuned with one NaN and one Inf in NAN_TENSOR."""
    root = tmp_path_factory.mktemp("poisoned")

    def poison(value):
        def edit(state):
            state[NAN_TENSOR][3, 5] = value

        return edit

    return {
        "aligned": derived_model(family.aligned, root / "aligned-nan", poison(float("nan"))),
        "finetuned": derived_model(family.finetuned, root / "finetuned-inf", poison(float("-inf"))),
    }


@pytest.mark.parametrize("method", ["lox_extrapolate", "lssf_fusion", "safelora_project"])
def test_nan_or_inf_input_names_the_tensor_and_the_model(family, poisoned, tmp_path, capsys, method):
    if method == "lox_extrapolate":
        document, bad, what = lox(family, aligned=poisoned["aligned"]), poisoned["aligned"], "1 NaN"
    else:
        document, bad, what = realign(family, method, finetuned=poisoned["finetuned"]), poisoned["finetuned"], "1 Inf"
    recipe = write(tmp_path / "recipe.yml", document)
    out = tmp_path / "out"
    code, _, err = run_cli(["run", recipe, str(out), "--quiet"], capsys)
    assert_error_line(code, err, f"input tensor {NAN_TENSOR} of model {bad} holds {what} value(s)")
    assert not out.exists()


def test_nan_input_to_safelora_select_is_an_error_not_a_skipped_tensor(family, poisoned, tmp_path, capsys):
    recipe = write(tmp_path / "recipe.yml", realign(family, "safelora_project", finetuned=poisoned["finetuned"]))
    out = tmp_path / "selected.yml"
    code, _, err = run_cli(["safelora-select", recipe, "--num-layers", "2", "-o", str(out)], capsys)
    assert_error_line(code, err, f"input tensor {NAN_TENSOR} of model {poisoned['finetuned']} holds 1 Inf")
    assert not out.exists()


def test_nan_in_an_adapter_names_the_adapter_tensor(family, lora_adapter, tmp_path, capsys):
    adapter = str(tmp_path / "adapter")
    shutil.copytree(lora_adapter, adapter)
    weights = os.path.join(adapter, "adapter_model.safetensors")
    tensors = load_file(weights)
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    out = tmp_path / "projected"
    code, _, err = run_cli(
        ["safelora-adapter", "--base", family.base, "--aligned", family.aligned, "--adapter", adapter, "-o", str(out)],
        capsys,
    )
    assert_error_line(code, err, f"input tensor {key} of adapter {adapter} holds 1 NaN")
    assert not out.exists()


def test_require_finite_counts_and_finds_the_bad_entry():
    """The shared helper on its own: the first entry with a non-finite value is named."""
    from mergekit.merge_methods.base import TensorEntry, TensorGroup, TensorMetadata

    from mergekit_lox.methods.inputs import NonFiniteInputError, require_finite

    good = torch.ones(4, 3, dtype=torch.bfloat16)
    bad = good.clone()
    bad[0, 0], bad[1, 1], bad[2, 2] = float("nan"), float("inf"), float("-inf")
    group = TensorGroup(
        entries=(TensorEntry("b", good, is_base=True), TensorEntry("x", good), TensorEntry("y", bad)),
        metadata=TensorMetadata(name="w"),
    )
    with pytest.raises(
        NonFiniteInputError, match=r"input tensor w of model y holds 1 NaN and 2 Inf value\(s\) \(of 12, as bfloat16\)"
    ):
        require_finite(group)
    require_finite(TensorGroup(entries=group.entries[:2], metadata=TensorMetadata(name="w")))


@pytest.fixture(scope="module")
def wide_vocab(family, tmp_path_factory):
    """The aligned model with 32 more tokens (vocabulary 128 instead of 96)."""
    generator = torch.Generator().manual_seed(5)

    def grow(state):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            extra = 0.05 * torch.randn(32, state[name].shape[1], generator=generator)
            state[name] = torch.cat([state[name], extra])

    root = tmp_path_factory.mktemp("vocab")
    return derived_model(family.aligned, root / "aligned-128", grow, {"vocab_size": 128}, vocab_size=128)


def test_vocabulary_mismatch_points_at_mergekit_tokenizer_options(
    family, wide_vocab, tmp_path, capsys, mergekit_never_runs
):
    recipe = write(tmp_path / "recipe.yml", lox(family, aligned=wide_vocab))
    code, _, err = run_cli(["run", recipe, str(tmp_path / "out")], capsys)
    assert_error_line(
        code,
        err,
        "document 1: tokenizer: models have different vocabulary sizes",
        f"base_model {family.base} (96)",
        f"{wide_vocab} (128)",
        "tokenizer: {source: base}",
    )
    assert mergekit_never_runs == []


def test_the_tokenizer_option_it_names_fixes_it(family, wide_vocab, tmp_path, capsys):
    document = dict(lox(family, aligned=wide_vocab), tokenizer={"source": "base"})
    recipe = write(tmp_path / "recipe.yml", document)
    code, _, err = run_cli(["run", recipe, str(tmp_path / "out"), "--quiet"], capsys)
    assert code == 0, err
    merged = load_state_dict(str(tmp_path / "out"))
    assert merged["model.embed_tokens.weight"].shape == (96, 64)


def test_unsafe_truncate_embeddings_leaves_it_to_mergekit(family, wide_vocab, tmp_path, capsys):
    recipe = write(tmp_path / "recipe.yml", lox(family, aligned=wide_vocab))
    code, _, err = run_cli(["run", recipe, str(tmp_path / "out"), "--quiet", "--unsafe-truncate-embeddings"], capsys)
    assert code == 0, err
    assert load_state_dict(str(tmp_path / "out"))["lm_head.weight"].shape == (96, 64)


def test_mergekit_own_vocabulary_error_stays_on_one_line(family, wide_vocab, tmp_path, capsys, monkeypatch):
    """A chain stage's vocabulary is only known once built: then mergekit's own
    message (tensor, shapes, tokenizer hint) is the error, still one line."""
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    from mergekit_lox import cli

    def unchecked(recipe, out, mergekit_args=None, intermediate_dir=None, strict=False):
        mergekit_yaml.main(args=[recipe, out, *(mergekit_args or [])], standalone_mode=False)

    monkeypatch.setattr(cli, "run_recipe", unchecked)
    recipe = write(tmp_path / "recipe.yml", lox(family, aligned=wide_vocab))
    code, _, err = run_cli(["run", recipe, str(tmp_path / "out"), "--quiet"], capsys)
    assert_error_line(code, err, "Tensor size mismatch for", "(128, 64)", "(96, 64)", "tokenizer: {source: base}")


@pytest.fixture(scope="module")
def narrow_mlp(family, tmp_path_factory):
    """The aligned model with intermediate size 96 instead of 128."""

    def shrink(state):
        for name in list(state):
            if "mlp" in name:
                axis = 1 if "down_proj" in name else 0
                state[name] = state[name].narrow(axis, 0, 96).contiguous()

    root = tmp_path_factory.mktemp("narrow")
    return derived_model(family.aligned, root / "aligned-96", shrink, {"intermediate_size": 96})


def test_tensor_shapes_that_differ_name_the_tensor_and_shapes(
    family, narrow_mlp, tmp_path, capsys, mergekit_never_runs
):
    recipe = write(tmp_path / "recipe.yml", lox(family, aligned=narrow_mlp))
    code, _, err = run_cli(["run", recipe, str(tmp_path / "out")], capsys)
    assert_error_line(
        code,
        err,
        "models[0].model: tensor model.layers.0.mlp.down_proj.weight has shape (64, 128)",
        f"in base_model {family.base} but (64, 96) in {narrow_mlp}",
        "and 5 more tensor(s)",
    )
    assert mergekit_never_runs == []


def retargeted_copy(adapter: str, path: str, q_proj_as: str) -> str:
    """A copy of ``adapter`` whose adapter_config.json targets ``q_proj_as`` instead of q_proj."""
    shutil.copytree(adapter, path)
    with open(os.path.join(path, "adapter_config.json")) as f:
        config = json.load(f)
    config["target_modules"] = [q_proj_as if t == "q_proj" else t for t in config["target_modules"]]
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return path


@pytest.fixture(scope="module")
def misfit_adapter(lora_adapter, tmp_path_factory):
    """The fixture adapter with q_proj renamed to query_proj (config and tensors)."""
    path = retargeted_copy(lora_adapter, str(tmp_path_factory.mktemp("misfit") / "adapter"), "query_proj")
    weights = os.path.join(path, "adapter_model.safetensors")
    tensors = {k.replace(".q_proj.", ".query_proj."): v for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    return path


def test_adapter_whose_modules_the_model_lacks(family, misfit_adapter, tmp_path, capsys, mergekit_never_runs):
    """PEFT would merge the adapter's other modules and skip query_proj silently."""
    document = realign(family, "safelora_project", finetuned=f"{family.aligned}+{misfit_adapter}")
    recipe = write(tmp_path / "recipe.yml", document)
    code, _, err = run_cli(["run", recipe, str(tmp_path / "out")], capsys)
    assert_error_line(
        code,
        err,
        "models[1].model (LoRA): adapter",
        misfit_adapter,
        "does not fit",
        "holds LoRA weights for 2 module(s)",
        "model.layers.0.self_attn.query_proj",
        "target_modules query_proj match no module",
    )
    assert mergekit_never_runs == []


def test_adapter_config_alone_misspelt_is_caught(family, lora_adapter, tmp_path, capsys):
    """Tensors fine, target_modules misspelt: PEFT would drop the q_proj weights as unexpected."""
    path = retargeted_copy(lora_adapter, str(tmp_path / "adapter"), "qproj")
    recipe = write(tmp_path / "recipe.yml", realign(family, "safelora_project", finetuned=f"{family.aligned}+{path}"))
    code, _, err = run_cli(["check", recipe], capsys)
    assert code == 1
    assert "target_modules qproj match no module" in err and "holds LoRA weights" not in err


def test_safelora_adapter_with_a_misfit_adapter(family, misfit_adapter, tmp_path, capsys):
    code, _, err = run_cli(
        [
            "safelora-adapter",
            "--base",
            family.base,
            "--aligned",
            family.aligned,
            "--adapter",
            misfit_adapter,
            "-o",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert_error_line(code, err, "query_proj", "not found in base model")


def test_finite_screen_does_not_refuse_finite_values_whose_sum_overflows():
    """The cheap screen (a float32 sum) overflows on huge but finite weights: the
    exact elementwise check must then let them through, and still catch a real Inf."""
    import torch
    from mergekit.merge_methods.base import TensorGroup

    from mergekit_lox.methods.inputs import NonFiniteInputError, require_finite

    huge = torch.full((4, 4), 3e38)
    assert not torch.isfinite(huge.sum(dtype=torch.float32))
    require_finite(TensorGroup.from_tensors([huge, huge.clone()], name="w", base_index=0))
    bad = huge.clone()
    bad[1, 2] = float("inf")
    with pytest.raises(NonFiniteInputError, match="w of model 1 holds 1 Inf"):
        require_finite(TensorGroup.from_tensors([huge, bad], name="w", base_index=0))
