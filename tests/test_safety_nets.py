"""Nothing lost, nothing silently wrong (issue 12): one test per class of failure.

Each test asserts the outcome a user sees: the exit code, the error line and
what it names, OUT absent or as it was, the user's files and the inputs
byte-identical. A full disk and failing writes are simulated by raising
OSError(ENOSPC) (or safetensors' own error carrying it) at the write points
mergekit and the project use, so the tests run anywhere.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import reference as ref
import torch
import yaml
from conftest import LORA_TARGETS, run_cli, run_merge_recipe
from safelora_helpers import lora_scaling
from safetensors.torch import load_file, save_file
from test_errors import assert_error_line, derived_model, realign
from test_outputs import digest, leftovers, lox_document, write

from mergekit_lox.demo.synthetic import FamilySpec, build_family, load_state_dict
from mergekit_lox.files.output import MANIFEST

QUIET = ["--quiet"]
NO_SPACE = "no space left on the device while writing"


def no_space_line(out, existed: bool) -> str:
    state = "is unchanged" if existed else "was not created"
    return (
        f"error: {NO_SPACE} {out}: nothing was written ({out} {state}); "
        "free some space or choose an OUT on another disk"
    )


@pytest.fixture(scope="module")
def family16(tmp_path_factory):
    """A valid float16 family (no NaN, no Inf), same planted structure."""
    return build_family(str(tmp_path_factory.mktemp("family16")), FamilySpec(seed=5), dtype=torch.float16)


@pytest.fixture
def inputs_unchanged(family):
    before = digest(family.root)
    yield
    assert digest(family.root) == before


# --------------------------------------------------------------------------- outputs are checked


def test_result_beyond_float16_is_refused_by_run(family16, tmp_path, capsys):
    document = dict(lox_document(family16, alpha=1.0e7))
    del document["dtype"]  # computed and stored as float16, the models' own dtype
    recipe = write(tmp_path / "recipe.yml", document)
    out = tmp_path / "out"
    code, _, err = run_cli(["run", recipe, str(out), *QUIET], capsys)
    line = assert_error_line(code, err, "output tensor ", " of lox_extrapolate holds ", "Inf value(s)")
    assert "exceeds the range of float16, the dtype it is stored in" in line
    assert "wider dtype" in line and "smaller alpha" in line
    assert not out.exists() and leftovers(tmp_path, "recipe.yml") == []

    # The same model with a moderate alpha is finite and written.
    write(tmp_path / "recipe.yml", dict(document, parameters={"alpha": 1.25, "rank": 4}))
    assert run_cli(["run", recipe, str(out), *QUIET], capsys)[0] == 0
    assert all(bool(torch.isfinite(t).all()) for t in load_state_dict(str(out)).values())


def test_cast_to_out_dtype_is_checked_in_plain_mergekit(family, tmp_path):
    """Computed in float32 (finite), stored as float16 (Inf): mergekit's own cast is checked."""
    from mergekit_lox.methods.inputs import NonFiniteOutputError

    document = dict(lox_document(family, alpha=1.0e7), out_dtype="float16")
    with pytest.raises(NonFiniteOutputError, match=r"holds \d+ Inf value\(s\) \(of \d+, as float16\)"):
        run_merge_recipe(document, tmp_path / "out")


# --------------------------------------------------------------------------- the LoRA merge cache


def _retrain(adapter: str, seed: int) -> dict:
    """Write new lora_B values into the adapter folder, as retraining would."""
    path = os.path.join(adapter, "adapter_model.safetensors")
    tensors = load_file(path)
    generator = torch.Generator().manual_seed(seed)
    for key in tensors:
        if "lora_B" in key:
            tensors[key] = 0.05 * torch.randn(tensors[key].shape, generator=generator)
    save_file(tensors, path, metadata={"format": "pt"})
    return {k: ref.f64(v) for k, v in tensors.items()}


def test_lora_cache_follows_the_adapter_contents(family, states, lora_adapter, tmp_path, capsys):
    """Retrain an adapter into the same folder: the re-run merges the new one."""
    adapter = shutil.copytree(lora_adapter, tmp_path / "adapter")
    # threshold -2 never projects: OUT is the merged fine-tune itself.
    document = realign(family, "safelora_project", finetuned=f"{family.aligned}+{adapter}", threshold=-2.0)
    recipe = write(tmp_path / "recipe.yml", document)
    out = tmp_path / "out"
    aligned = {k: ref.f64(v) for k, v in states["aligned"].items()}
    name = f"model.layers.0.self_attn.{LORA_TARGETS[0]}.weight"

    for seed in (1, 2):
        lora = _retrain(str(adapter), seed)
        code, _, err = run_cli(["run", recipe, str(out), *QUIET], capsys)
        assert code == 0, err
        expected = ref.peft_lora_finetuned(aligned, lora, lora_scaling)[name]
        assert ref.rel_err(ref.f64(load_state_dict(str(out))[name]), expected) < 1e-5
        if seed == 2:
            assert f"merged {adapter} into {family.aligned} again: the adapter or the model changed" in err

    code, _, err = run_cli(["run", recipe, str(out), *QUIET], capsys)
    assert code == 0 and f"reusing the merge of {adapter} into {family.aligned}" in err


# --------------------------------------------------------------------------- command-line numbers


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--threshold", "nan", "nan is not a valid float (finite), as safelora_project's `threshold`"),
        ("--threshold", "inf", "inf is not a valid float (finite), as safelora_project's `threshold`"),
        ("--rank", "0", "0 is not a valid int (> 0), as safelora_project's `rank`"),
    ],
)
def test_numeric_options_are_checked_as_the_recipe_parameter(
    family, lora_adapter, tmp_path, capsys, option, value, message
):
    out = tmp_path / "out"
    args = ["--base", family.base, "--aligned", family.aligned, "--adapter", lora_adapter, "-o", str(out)]
    code, _, err = run_cli(["safelora-adapter", *args, option, value], capsys)
    assert code == 2 and f"Invalid value for '{option}': {message}" in err
    assert not out.exists()


def test_library_callers_get_the_same_rule(family, lora_adapter, tmp_path):
    from mergekit_lox.safelora_tools import SafeLoRAToolError, safelora_adapter

    with pytest.raises(SafeLoRAToolError, match=r"--threshold nan is not a valid float \(finite\)"):
        safelora_adapter(family.base, family.aligned, lora_adapter, str(tmp_path / "o"), threshold=float("nan"))


# --------------------------------------------------------------------------- analyze


def test_analyze_refuses_a_nonfinite_input(family, tmp_path, capsys):
    name = "model.layers.0.self_attn.v_proj.weight"

    def poison(state):
        state[name][2, 3] = float("nan")

    finetuned = derived_model(family.finetuned, tmp_path / "finetuned-nan", poison)
    out = tmp_path / "analysis"
    code, _, err = run_cli(
        ["analyze", "--base", family.base, "--aligned", family.aligned, "--finetuned", finetuned, "-o", str(out)],
        capsys,
    )
    assert_error_line(code, err, f"input tensor {name} of model {finetuned} holds 1 NaN value(s)", "repair or replace")
    assert not out.exists()


# --------------------------------------------------------------------------- check


def test_duplicate_key_is_refused_by_check_and_run(family, tmp_path, capsys):
    text = yaml.safe_dump(lox_document(family), sort_keys=False).replace("  rank: 4\n", "  rank: 4\n  alpha: 2.0\n")
    recipe = str(tmp_path / "recipe.yml")
    with open(recipe, "w", encoding="utf-8") as f:
        f.write(text)
    expected = "key 'alpha' is given twice in one mapping (first at line"
    code, _, err = run_cli(["check", recipe], capsys)
    assert_error_line(code, err, f"error: {recipe}: document 1: line ", expected)
    code, _, err = run_cli(["run", recipe, str(tmp_path / "out")], capsys)
    assert_error_line(code, err, expected)
    assert not (tmp_path / "out").exists()


def test_layer_counts_that_differ_name_the_models(family, tmp_path_factory, tmp_path, capsys):
    deeper = build_family(str(tmp_path_factory.mktemp("deeper")), FamilySpec(num_hidden_layers=3))
    recipe = write(tmp_path / "recipe.yml", lox_document(family) | {"base_model": deeper.base})
    fragments = ("models have different numbers of layers", f"base_model {deeper.base} (3)", f"{family.aligned} (2)")
    code, _, err = run_cli(["check", recipe], capsys)
    assert_error_line(code, err, *fragments)
    code, _, err = run_cli(["run", recipe, str(tmp_path / "out")], capsys)
    assert_error_line(code, err, *fragments)


# --------------------------------------------------------------------------- the staged output is verified


@pytest.fixture
def failing_tokenizer_copy(monkeypatch):
    """mergekit's tokenizer copy (shutil.copy) writes 0 bytes of tokenizer.json, then fails;
    mergekit logs that and carries on."""

    def arm(error):
        original = shutil.copy

        def copy(src, dst, *args, **kwargs):
            if os.path.basename(str(src)) == "tokenizer.json":
                open(os.path.join(dst, "tokenizer.json") if os.path.isdir(dst) else dst, "wb").close()
                raise error
            return original(src, dst, *args, **kwargs)

        monkeypatch.setattr(shutil, "copy", copy)

    return arm


def test_tokenizer_copy_on_a_full_disk_leaves_out_unchanged(
    family, tmp_path, capsys, monkeypatch, failing_tokenizer_copy, inputs_unchanged
):
    out = tmp_path / "out"
    recipe = write(tmp_path / "recipe.yml", lox_document(family))
    assert run_cli(["run", recipe, str(out), *QUIET], capsys)[0] == 0
    previous = digest(out)
    failing_tokenizer_copy(OSError(errno.ENOSPC, "No space left on device"))
    code, _, err = run_cli(["run", recipe, str(out), *QUIET], capsys)
    assert code == 1 and err.strip().splitlines()[-1] == no_space_line(out, existed=True)
    assert digest(out) == previous and leftovers(tmp_path, "recipe.yml", "out") == []


def test_other_swallowed_failures_are_named(family, tmp_path, capsys, failing_tokenizer_copy):
    failing_tokenizer_copy(PermissionError(errno.EACCES, "Permission denied"))
    out = tmp_path / "out"
    recipe = write(tmp_path / "recipe.yml", lox_document(family))
    code, _, err = run_cli(["run", recipe, str(out), *QUIET], capsys)
    assert_error_line(
        code,
        err,
        f"error: {out}: the merge did not write a complete model: tokenizer.json is 0 bytes, its source ",
        "mergekit logged: [Errno 13] Permission denied",
        f"({out} was not created)",
    )
    assert not out.exists()


def test_disk_full_while_writing_weights(family, tmp_path, capsys, monkeypatch):
    """safetensors reports ENOSPC as its own error type, not OSError."""
    import safetensors.torch
    from safetensors import SafetensorError

    out = tmp_path / "out"
    recipe = write(tmp_path / "recipe.yml", lox_document(family))
    assert run_cli(["run", recipe, str(out), *QUIET], capsys)[0] == 0
    previous = digest(out)

    def save_file_on_a_full_disk(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 64)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file_on_a_full_disk)
    code, _, err = run_cli(["run", recipe, str(out), *QUIET], capsys)
    assert code == 1 and err.strip().splitlines()[-1] == no_space_line(out, existed=True)
    assert digest(out) == previous


def test_verify_model_output_finds_a_shard_the_index_misses(tmp_path):
    from mergekit_lox.files.verify import IncompleteOutputError, verify_model_output

    (tmp_path / "config.json").write_text("{}")
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(2)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    verify_model_output(str(tmp_path))  # complete
    del index["weight_map"]["b"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(IncompleteOutputError, match="model-00002-of-00002.safetensors is not listed in"):
        verify_model_output(str(tmp_path))


# --------------------------------------------------------------------------- user files are never lost


def test_rerun_replaces_only_what_a_merge_wrote(family, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = write(tmp_path / "recipe.yml", lox_document(family))
    assert run_cli(["run", recipe, str(out), *QUIET], capsys)[0] == 0
    with open(out / MANIFEST) as f:
        assert sorted(json.load(f)["files"]) == sorted(e for e in os.listdir(out) if e != MANIFEST)
    (out / "eval-results.json").write_text('{"asr": 0.1}')
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step-10.pt").write_bytes(b"user data")
    code, _, err = run_cli(["run", recipe, str(out), *QUIET], capsys)
    assert_error_line(
        code, err, "holds 2 file(s) that a merge did not write: checkpoints/step-10.pt, eval-results.json"
    )
    assert (out / "eval-results.json").read_text() == '{"asr": 0.1}'
    assert (out / "checkpoints" / "step-10.pt").read_bytes() == b"user data"

    shutil.move(str(out / "eval-results.json"), tmp_path / "kept.json")
    shutil.rmtree(out / "checkpoints")
    assert run_cli(["run", recipe, str(out), *QUIET], capsys)[0] == 0


def test_safelora_select_never_overwrites_its_recipe_or_a_users_file(family, tmp_path, capsys):
    recipe = write(tmp_path / "recipe.yml", realign(family, "safelora_project"))
    notes = tmp_path / "notes.yml"
    notes.write_text("mine\n")
    before = digest(tmp_path)
    code, _, err = run_cli(["safelora-select", recipe, "--num-layers", "2", "-o", recipe], capsys)
    assert_error_line(code, err, f"output {recipe} is the input recipe {recipe}")
    code, _, err = run_cli(["safelora-select", recipe, "--num-layers", "2", "-o", str(notes)], capsys)
    assert_error_line(code, err, f"output {notes} already exists and was not written by safelora-select")
    assert digest(tmp_path) == before


def test_demo_never_overwrites_a_users_files(tmp_path, capsys):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "lox.yml").write_text("my own recipe\n")
    code, _, err = run_cli(["demo", str(folder)], capsys)
    assert_error_line(code, err, f"{folder} already holds files that mergekit-lox demo did not write (lox.yml)")
    assert os.listdir(folder) == ["lox.yml"] and (folder / "lox.yml").read_text() == "my own recipe\n"


# --------------------------------------------------------------------------- errors name the culprit


def test_errors_that_used_to_name_nothing(family, tmp_path, capsys, monkeypatch):
    import mergekit.scripts.run_yaml

    ran = []
    monkeypatch.setattr(mergekit.scripts.run_yaml, "run_merge", lambda *a, **k: ran.append(a))
    out = str(tmp_path / "out")

    latin = tmp_path / "latin.yml"
    latin.write_bytes(yaml.safe_dump(lox_document(family)).encode() + b"# caf\xe9\n")
    for command in (["check", str(latin)], ["run", str(latin), out]):
        code, _, err = run_cli(command, capsys)
        assert_error_line(code, err, f"error: {latin}: recipe: not UTF-8 text: byte 0xe9 at line ")

    truncated = shutil.copytree(family.aligned, tmp_path / "truncated")
    weights = os.path.join(truncated, "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) // 2)
    recipe = write(tmp_path / "truncated.yml", lox_document(family) | {"models": [{"model": str(truncated)}]})
    code, _, err = run_cli(["run", recipe, out], capsys)
    assert_error_line(code, err, f"{weights} is not a readable safetensors file (")

    hub = write(tmp_path / "hub.yml", lox_document(family) | {"base_model": "nobody-here/no-such-model"})
    code, _, err = run_cli(["run", hub, out], capsys)
    assert_error_line(code, err, "base_model: model nobody-here/no-such-model: not a local directory, and fetching")

    recipe = write(tmp_path / "recipe.yml", lox_document(family))
    code, _, err = run_cli(["run", recipe, out, "--out-shard-size", "abc"], capsys)
    assert code == 2 and "Invalid value for '--out-shard-size': 'abc' is not a size" in err

    cache = os.path.join(out, "cache")
    code, _, err = run_cli(["run", recipe, out, "--lora-merge-cache", cache], capsys)
    assert_error_line(code, err, f"--lora-merge-cache {cache} is inside OUT {out}")
    assert ran == [] and not os.path.exists(out)


# --------------------------------------------------------------------------- edges


def test_a_long_out_name_works(family, tmp_path, capsys):
    out = tmp_path / ("m" * 240)
    recipe = write(tmp_path / "recipe.yml", lox_document(family))
    code, _, err = run_cli(["run", recipe, str(out), *QUIET], capsys)
    assert code == 0, err
    assert os.path.isfile(out / "model.safetensors")
    assert sorted(os.listdir(tmp_path)) == sorted(["recipe.yml", out.name])


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_staging_folders_of_killed_runs_are_cleaned(family, tmp_path, capsys):
    import socket

    from mergekit_lox.files.output import staging_prefix

    out = tmp_path / "out"
    recipe = write(tmp_path / "recipe.yml", lox_document(family))
    assert run_cli(["run", recipe, str(out), *QUIET], capsys)[0] == 0
    previous = digest(out)

    def leftover(suffix, pid, with_previous=False):
        root = tmp_path / (staging_prefix(str(tmp_path), "out") + suffix)
        (root / "out").mkdir(parents=True)
        (root / "out" / "model-00001-of-00002.safetensors").write_bytes(b"half")
        (root / ".owner").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
        if with_previous:
            os.replace(out, root / ".replaced")  # killed between the two renames
        return root

    killed = leftover("abcd1234", _dead_pid(), with_previous=True)
    running = leftover("efgh5678", os.getpid())
    code, _, err = run_cli(["run", recipe, str(out), *QUIET], capsys)
    assert code == 0, err
    assert f"note: put back {out}" in err and f"note: removed staging folder {killed}" in err
    assert f"note: staging folder {running} " in err and "is still going" in err
    assert not killed.exists() and running.exists()
    assert digest(out).keys() == previous.keys()


def test_outputs_get_the_usual_permissions(family, lora_adapter, tmp_path, capsys):
    umask = os.umask(0o022)
    os.umask(umask)
    usual = 0o777 & ~umask
    out = tmp_path / "merged"
    recipe = write(tmp_path / "recipe.yml", lox_document(family))
    assert run_cli(["run", recipe, str(out), *QUIET], capsys)[0] == 0
    adapter_out = tmp_path / "projected"
    args = ["--base", family.base, "--aligned", family.aligned, "--adapter", lora_adapter, "-o", str(adapter_out)]
    assert run_cli(["safelora-adapter", *args], capsys)[0] == 0
    for folder in (out, adapter_out):
        assert stat.S_IMODE(os.stat(folder).st_mode) == usual
    with open(adapter_out / "safelora.json") as f:
        json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"{c} in safelora.json"))


def test_kernels_never_return_an_input_tensor():
    """A result that is an input (LoX's and LSSF's 1-D weights, Safe LoRA's unprojected
    W_f) comes back as a copy: mergekit's writer keeps results until their shard is
    written, and a kept input would keep its whole memory-mapped shard resident
    (docs/performance.md, the full 1B shape). Values are unchanged."""
    from mergekit.merge_methods import merge_tensors

    import mergekit_lox  # noqa: F401

    generator = torch.Generator().manual_seed(3)
    base, aligned, finetuned = (torch.randn(24, 16, generator=generator) for _ in range(3))
    norm_base, norm_aligned, norm_finetuned = (torch.randn(16, generator=generator) for _ in range(3))
    cases = [
        ([norm_base, norm_aligned], "lox_extrapolate", {}, norm_aligned),
        ([norm_base, norm_aligned, norm_finetuned], "lssf_fusion", {}, norm_finetuned),
        ([base, aligned, finetuned], "safelora_project", {"threshold": -1.0}, finetuned),  # never projected
    ]
    for tensors, method, parameters, passed_through in cases:
        roles = {} if method == "lox_extrapolate" else {"role": {1: "aligned", 2: "finetuned"}}
        out = merge_tensors(tensors, method, base_index=0, parameters={**parameters, **roles})
        assert torch.equal(out, passed_through), method
        pointers = {t.untyped_storage().data_ptr() for t in tensors}
        assert out.untyped_storage().data_ptr() not in pointers, method
