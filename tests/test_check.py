"""`mergekit-lox check`: every class of problem is caught and named (document, field).

Each case starts from a valid recipe on the local fixture family and breaks one
thing; the report must contain that problem, at that document and field, and
nothing is ever computed (check never loads a tensor).
"""

from __future__ import annotations

import copy
import os

import pytest
import yaml

from mergekit_lox import cli
from mergekit_lox.check import check_text


def lox_doc(family, **changes):
    doc = {
        "merge_method": "lox_extrapolate",
        "base_model": family.base,
        "models": [{"model": family.aligned, "parameters": {"role": "aligned"}}],
        "parameters": {"alpha": 1.25, "rank": 6},
        "dtype": "float32",
    }
    doc.update(changes)
    return doc


def realign_doc(family, method="lssf_fusion", finetuned=None, **parameters):
    return {
        "merge_method": method,
        "base_model": family.base,
        "models": [
            {"model": family.aligned, "parameters": {"role": "aligned"}},
            {"model": finetuned or family.finetuned, "parameters": {"role": "finetuned"}},
        ],
        "parameters": parameters,
    }


def ties_doc(family):
    return {
        "merge_method": "ties",
        "base_model": family.aligned,
        "models": [
            {"model": family.finetuned, "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": "hardened", "parameters": {"weight": 0.5, "density": 0.5}},
        ],
    }


def chain(family):
    return [
        dict(lox_doc(family), name="hardened"),
        dict(ties_doc(family), name="merged"),
        realign_doc(family, finetuned="merged"),
    ]


def dump(documents) -> str:
    return yaml.safe_dump_all(documents, sort_keys=False)


def problems(text):
    report = check_text(text, "recipe.yml")
    return [(p.document, p.field, p.message) for p in report.problems]


def assert_problem(found, document, field, *fragments):
    matches = [(d, f, m) for d, f, m in found if d == document and f == field and all(x in m for x in fragments)]
    assert matches, f"expected {document} / {field} / {fragments} in {found}"


def test_valid_single_documents_and_chain(family):
    for documents in (
        [lox_doc(family)],
        [realign_doc(family, scale=0.5, rank=0, eta=0.8, top_weight=1.5)],
        [realign_doc(family, "safelora_project", threshold=0.4, projection="orthogonal", rank=4)],
        chain(family),
    ):
        assert problems(dump(documents)) == []


@pytest.mark.parametrize(
    "alpha",
    [
        [{"filter": "embed_tokens", "value": 0}, {"value": 1.25}],  # docs/methods.md's example
        {"filter": "lm_head", "value": 1.0},
        [1.0, 1.5],  # a gradient over layers
        [{"filter": "mlp", "value": [0.5, 1.5]}, {"value": 1.25}],
        "1e-3",  # YAML 1.1 reads this as a string; mergekit validates it as a float
    ],
)
def test_conditional_and_gradient_values_are_accepted(family, alpha):
    assert problems(dump([lox_doc(family, parameters={"alpha": alpha, "rank": 6})])) == []


def test_yaml_syntax_error_names_line_and_document(family):
    text = dump([lox_doc(family)]) + "---\nmerge_method: lox_extrapolate\nmodels: [a, b\nparameters: {}\n"
    found = problems(text)
    assert len(found) == 1
    document, field, message = found[0]
    lines = text.splitlines()
    bad_line = int(field.split()[-1])
    assert document == "document 2" and field.startswith("line ") and "YAML syntax error" in message
    assert lines[bad_line - 1].startswith(("models", "parameters"))


CASES = {
    "schema-missing-field": (
        lambda d, fam: d[0]["models"][0].pop("model"),
        ("document 1", "models[0].model", "schema", "Field required"),
    ),
    "schema-wrong-shape": (
        lambda d, fam: d[0].update(models="aligned"),
        ("document 1", "models", "schema"),
    ),
    "schema-no-models": (
        lambda d, fam: d[0].pop("models"),
        ("document 1", "models", "Exactly one of 'models', 'slices', or 'modules'"),
    ),
    "unknown-top-level-field": (
        lambda d, fam: d[0].update(paramters=d[0].pop("parameters")),
        ("document 1", "paramters", "unknown field", "did you mean 'parameters'"),
    ),
    "unknown-model-field": (
        lambda d, fam: d[0]["models"][0].update(parameter=d[0]["models"][0].pop("parameters")),
        ("document 1", "models[0].parameter", "unknown field", "did you mean 'parameters'"),
    ),
    "unknown-method": (
        lambda d, fam: d[0].update(merge_method="lox_extrapolat"),
        ("document 1", "merge_method", "unknown merge method 'lox_extrapolat'", "did you mean 'lox_extrapolate'"),
    ),
    "unknown-parameter": (
        lambda d, fam: d[0]["parameters"].update(alpah=d[0]["parameters"].pop("alpha")),
        ("document 1", "parameters.alpah", "lox_extrapolate has no parameter 'alpah'", "did you mean 'alpha'"),
    ),
    "wrong-type": (
        lambda d, fam: d[0]["parameters"].update(alpha="high"),
        ("document 1", "parameters.alpha", "'high' is not a valid float"),
    ),
    "out-of-range": (
        lambda d, fam: d[0]["parameters"].update(rank=-1),
        ("document 1", "parameters.rank", "-1 is not a valid int (>= 0)"),
    ),
    "not-finite": (
        lambda d, fam: d[0]["parameters"].update(alpha=float("inf")),
        ("document 1", "parameters.alpha", "finite"),
    ),
    "conditional-value-type": (
        lambda d, fam: d[0]["parameters"].update(alpha=[{"filter": "embed", "value": "x"}, {"value": 1.25}]),
        ("document 1", "parameters.alpha[0].value", "'x' is not a valid float"),
    ),
    "conditional-unknown-key": (
        lambda d, fam: d[0]["parameters"].update(alpha=[{"filer": "embed", "value": 0}, {"value": 1.25}]),
        ("document 1", "parameters.alpha[0].filer", "did you mean 'filter'"),
    ),
    "integer-gradient": (
        lambda d, fam: d[0]["parameters"].update(rank=[2, 6]),
        ("document 1", "parameters.rank", "gradient [2, 6] interpolates", "valid integer"),
    ),
    "shared-parameter-under-model": (
        lambda d, fam: d[0]["models"][0]["parameters"].update(alpha=2.0),
        ("document 1", "models[0].parameters.alpha", "shared parameter", "ignores it"),
    ),
    "bad-dtype": (
        lambda d, fam: d[0].update(dtype="float33"),
        ("document 1", "dtype", "unknown floating-point dtype 'float33'"),
    ),
    "base-missing": (
        lambda d, fam: d[0].pop("base_model"),
        ("document 1", "base_model", "lox_extrapolate requires a base_model"),
    ),
    "too-many-models": (
        lambda d, fam: d[0]["models"].append({"model": fam.finetuned}),
        ("document 1", "models", "exactly 1 non-base inputs"),
    ),
    "local-path-missing": (
        lambda d, fam: d[0].update(base_model=fam.base + "-missing"),
        ("document 1", "base_model", "does not exist"),
    ),
    "local-dir-not-a-model": (
        lambda d, fam: d[0].update(base_model=os.path.dirname(fam.base)),
        ("document 1", "base_model", "is not a model directory (no config.json)"),
    ),
    "lora-not-an-adapter": (
        lambda d, fam: d[0]["models"][0].update(model=fam.aligned + "+" + fam.finetuned),
        ("document 1", "models[0].model (LoRA)", "not a PEFT adapter directory"),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_single_document_problem_is_caught_and_named(family, case):
    mutate, expected = CASES[case]
    documents = [lox_doc(family)]
    mutate(documents, family)
    assert_problem(problems(dump(documents)), *expected)


REALIGN_CASES = {
    "role-missing": (
        lambda d: d["models"][1]["parameters"].pop("role"),
        ("models", "safelora_project needs base_model plus exactly 2", "has no role"),
    ),
    "role-duplicated": (
        lambda d: d["models"][1]["parameters"].update(role="aligned"),
        ("models", "role 'aligned' is given to both"),
    ),
    "role-misspelt": (
        lambda d: d["models"][1]["parameters"].update(role="fine-tuned"),
        ("models", "has role 'fine-tuned'"),
    ),
    "literal-parameter": (
        lambda d: d["parameters"].update(projection="diagonal"),
        ("parameters.projection", "'diagonal' is not a valid 'scaled' | 'orthogonal'"),
    ),
    "positive-rank": (
        lambda d: d["parameters"].update(rank=0),
        ("parameters.rank", "0 is not a valid int (> 0)"),
    ),
}


@pytest.mark.parametrize("case", sorted(REALIGN_CASES))
def test_roles_and_method_types_are_checked(family, case):
    mutate, (field, *fragments) = REALIGN_CASES[case]
    doc = realign_doc(family, "safelora_project", threshold=0.5)
    mutate(doc)
    assert_problem(problems(dump([doc])), "document 1", field, *fragments)


def test_required_parameter_of_a_mergekit_method(family):
    documents = chain(family)
    documents[1]["models"][0]["parameters"].pop("weight")
    documents[1]["parameters"] = {"lamda": 1.0}
    found = problems(dump(documents))
    assert_problem(found, "document 2 ('merged')", "models[0].parameters.weight", "missing required parameter of ties")
    assert_problem(
        found, "document 2 ('merged')", "parameters.lamda", "ties has no parameter 'lamda'", "did you mean 'lambda'"
    )


CHAIN_CASES = {
    "unknown-reference": (
        lambda d: d[2]["models"][1].update(model="mergd"),
        ("document 3 (final)", "models[1].model", "unknown reference 'mergd'", "did you mean 'merged'"),
    ),
    "cycle": (
        lambda d: d[0].update(base_model="merged"),
        ("document 1 ('hardened')", "base_model", "chain cycle: hardened -> merged -> hardened"),
    ),
    "self-reference": (
        lambda d: d[1].update(base_model="merged"),
        ("document 2 ('merged')", "base_model", "chain cycle: merged -> merged"),
    ),
    "duplicate-name": (
        lambda d: d[1].update(name="hardened"),
        ("document 2 ('hardened')", "name", "duplicate name, already used by document 1"),
    ),
    "two-unnamed": (
        lambda d: d[1].pop("name"),
        ("recipe", "name", "documents 2, 3 have no `name:`"),
    ),
    "all-named": (
        lambda d: d[2].update(name="final"),
        ("recipe", "name", "every document has a `name:`"),
    ),
    "name-climbs-out": (
        lambda d: d[0].update(name="../../victim"),
        ("document 1 ('../../victim')", "name", "'../../victim' holds a path separator"),
    ),
    "name-absolute": (
        lambda d: d[0].update(name="/tmp/victim"),
        ("document 1 ('/tmp/victim')", "name", "holds a path separator"),
    ),
    "name-dot-dot": (
        lambda d: d[0].update(name=".."),
        ("document 1 ('..')", "name", "is '..', not a folder name"),
    ),
    "name-not-a-string": (
        lambda d: d[0].update(name=["x"]),
        ("document 1", "name", "must be a string"),
    ),
}


@pytest.mark.parametrize("case", sorted(CHAIN_CASES))
def test_chain_problem_is_caught_and_named(family, case):
    mutate, expected = CHAIN_CASES[case]
    documents = copy.deepcopy(chain(family))
    mutate(documents)
    assert_problem(problems(dump(documents)), *expected)


def test_empty_document(family):
    text = dump(chain(family)) + "---\n"
    assert_problem(problems(text), "document 4", "", "empty document")


def test_hub_id_is_accepted_and_said_so(family):
    doc = lox_doc(family, base_model="meta-llama/Llama-2-7b-hf")
    report = check_text(dump([doc]), "r.yml")
    assert report.problems == []
    assert [str(n) for n in report.notes] == [
        "document 1: base_model: meta-llama/Llama-2-7b-hf is not a local path; "
        "taken as a Hugging Face ID (not checked offline)"
    ]


def test_cli_exit_status_and_one_line_per_problem(family, tmp_path, capsys):
    good = tmp_path / "good.yml"
    good.write_text(dump(chain(family)))
    bad_documents = chain(family)
    bad_documents[0]["parameters"]["alpah"] = 1.0
    bad_documents[2]["models"][1]["model"] = "mergd"
    bad = tmp_path / "bad.yml"
    bad.write_text(dump(bad_documents))

    cli.main(["check", str(good)])  # returns normally: exit status 0
    out = capsys.readouterr()
    assert out.err == "" and out.out.strip().splitlines()[-1].startswith(f"ok: {good}: chain of 3 documents")

    with pytest.raises(SystemExit) as exit_:
        cli.main(["check", str(bad)])
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(
        f"error: {bad}: document 1 ('hardened'): parameters.alpah: lox_extrapolate has no parameter"
    )
    assert lines[1].startswith(f"error: {bad}: document 3 (final): models[1].model: unknown reference 'mergd'")


def test_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["check", str(tmp_path / "nope.yml")])
    assert exit_.value.code == 1
    assert "nope.yml: recipe: cannot read" in capsys.readouterr().err
