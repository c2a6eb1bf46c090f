"""files/output.py's small helpers, used by analyze, safelora-select and safelora-adapter."""

from __future__ import annotations

import os

import pytest

from mergekit_lox.files.hub import looks_like_hub_id
from mergekit_lox.files.output import atomic_write_text, input_holding


def test_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "report.html"
    atomic_write_text(str(path), "first\n")
    assert path.read_text() == "first\n"
    atomic_write_text(str(path), "second\n")
    assert path.read_text() == "second\n"

    with pytest.raises(TypeError):
        atomic_write_text(str(path), 12345)  # fails while writing: nothing replaced
    assert path.read_text() == "second\n"
    assert sorted(os.listdir(tmp_path)) == ["report.html"], "no partial file is left behind"


def test_input_holding_names_the_input_that_would_be_written_into(tmp_path):
    model, adapter = tmp_path / "model", tmp_path / "adapter"
    model.mkdir()
    adapter.mkdir()
    (tmp_path / "file").write_text("x")
    inputs = [("base model", str(model)), ("adapter", str(adapter)), ("missing", str(tmp_path / "gone"))]
    assert input_holding(str(adapter / "out"), inputs) == ("adapter", str(adapter))
    assert input_holding(str(model), inputs) == ("base model", str(model))
    assert input_holding(str(tmp_path / "out"), inputs) is None  # beside the inputs
    assert input_holding(str(tmp_path), inputs) is None  # above them: writing there is not into them
    assert input_holding(str(tmp_path / "file" / "x"), [("file", str(tmp_path / "file"))]) is None
    assert input_holding(str(model / "x"), [("none", None), ("empty", "")]) is None
    os.symlink(model, tmp_path / "link")
    assert input_holding(str(tmp_path / "link" / "out"), inputs) == ("base model", str(model))


@pytest.mark.parametrize(
    "text, hub",
    [
        ("meta-llama/Llama-2-7b-chat-hf", True),
        ("owner/name.v1_2", True),
        ("models/.hidden", False),
        ("name", False),
        ("a/b/c", False),
        ("/abs/path", False),
        ("./rel", False),
    ],
)
def test_one_hub_id_pattern(text, hub):
    assert looks_like_hub_id(text) is hub


def test_temporary_files_get_unpredictable_names_created_exclusively(tmp_path, monkeypatch):
    """Issue 23: `report.html.partial` (and a pid-derived name) were opened through a
    symlink planted there: the write went into the link's target."""
    import secrets

    from mergekit_lox.files import output

    victim = tmp_path / "victim.txt"
    victim.write_text("the user's")
    target = tmp_path / "report.html"
    draws = iter(["aaaaaaaa", "bbbbbbbb"])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(draws))
    prefix = output.staging_prefix(str(tmp_path), "report.html")
    os.symlink(victim, tmp_path / f"{prefix}aaaaaaaa")  # planted at the first name drawn
    atomic_write_text(str(target), "<html>")
    assert target.read_text() == "<html>" and victim.read_text() == "the user's"
    assert os.path.islink(tmp_path / f"{prefix}aaaaaaaa")  # left alone; another name was drawn
    assert not os.path.exists(tmp_path / f"{prefix}bbbbbbbb")  # renamed over the target


def test_files_a_command_did_not_write_are_not_overwritten(tmp_path):
    from mergekit_lox.files.output import OutputError, claim_files, refuse_foreign_files

    (tmp_path / "report.html").write_text("the user's")
    (tmp_path / "notes.txt").write_text("kept")
    with pytest.raises(OutputError, match=r"already holds report.html, which mergekit-lox eval did not write"):
        refuse_foreign_files(str(tmp_path), ["eval.json", "report.html"], "mergekit-lox eval")
    with pytest.raises(OutputError, match="report.html"):
        claim_files(str(tmp_path), ["eval.json", "report.html"], "mergekit-lox eval")
    fresh = tmp_path / "fresh"
    claim_files(str(fresh), ["eval.json", "report.html"], "mergekit-lox eval")
    (fresh / "report.html").write_text("ours")
    refuse_foreign_files(str(fresh), ["eval.json", "report.html"], "mergekit-lox eval")  # ours: may be replaced
    assert (tmp_path / "report.html").read_text() == "the user's"


def test_files_added_to_out_during_a_run_stop_the_swap(tmp_path):
    """Issue 23: OUT was checked once, before the run, then replaced whole."""
    from mergekit_lox.files.output import OutputError, staged_output

    out = tmp_path / "out"
    with staged_output(str(out), markers=("done",), writer="test") as staging:
        os.makedirs(staging)
        (tmp_path / "out.txt").write_text("x")
        open(os.path.join(staging, "done"), "w").close()
    with pytest.raises(OutputError, match=r"1 file\(s\) appeared in it during the run .*added.txt.*not kept"):
        with staged_output(str(out), markers=("done",), writer="test") as staging:
            os.makedirs(staging)
            open(os.path.join(staging, "done"), "w").close()
            (out / "added.txt").write_text("the user's, written while the run computed")
    assert (out / "added.txt").read_text().startswith("the user's") and (out / "done").exists()
    assert [e for e in os.listdir(tmp_path) if e.startswith(".")] == []  # no staging folder left
