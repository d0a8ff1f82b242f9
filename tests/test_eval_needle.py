"""``ahfa-eval needle`` on the CPU: where the pass key lands, the command end to end on a tiny Llama (a random
model: its answers are wrong, the bookkeeping is what is checked), a model that always finds the key, and
bad input."""

from __future__ import annotations

import json

import pytest

from hf_ahfa.eval import cli, needle
from hf_ahfa.eval.usage import UsageError


def test_build_prompt_places_the_needle_at_its_depth():
    filler, key, question, start = list(range(100, 400)), [1, 2, 3], [7, 8], [0]
    for depth in (0.0, 0.25, 0.5, 1.0):
        ids, at = needle.build_prompt(filler, key, question, start, 64, depth)
        room = 64 - 1 - 3 - 2
        assert len(ids) == 64 and ids[:1] == start and ids[-2:] == question
        assert ids[at:at + 3] == key and at == 1 + round(depth * room)
        assert [x for x in ids[1:-2] if x >= 100] == filler[:room]  # the filler in order, nothing lost
    with pytest.raises(UsageError, match="context length 64: 10 filler tokens"):
        needle.build_prompt(filler[:10], key, question, start, 64, 0.5)


def _run(*argv):
    cli.main(["needle", *map(str, argv)])


@pytest.fixture
def book(tmp_path, tiny_text):
    path = tmp_path / "book.txt"
    path.write_text(tiny_text(3000, 5))
    return path


def test_needle_end_to_end(tiny_llama, book, tmp_path, capsys):
    _run("--model", tiny_llama, "--data-files", book, "--context-lengths", "96,128", "--depths", "0.2,0.8",
         "--trials", 2, "--new-tokens", 3, "--mode", "adaptive", "--tau", "1.0", "--block-size", 16,
         "--device", "cpu", "--out-dir", tmp_path, "--name", "n")
    data = json.loads((tmp_path / "n.json").read_text())
    rows = data["rows"]
    assert len(rows) == 2 * 2 * 2 * 2  # lengths x depths x trials x (adaptive, exact)
    assert {r["impl"] for r in rows} == {"ahfa-adaptive-tau1", "ahfa-exact"}
    # the same pass key and prompt for both implementations; tau = 1 keeps every block: the same answers
    pairs = {}
    for r in rows:
        pairs.setdefault((r["ctx"], r["depth"], r["trial"]), []).append(r)
    assert all(a["pass_key"] == b["pass_key"] and a["answer"] == b["answer"] for a, b in pairs.values())
    table = {(x["impl"], x["ctx"]): x for x in data["summary"]["by_context"]}
    assert table["ahfa-adaptive-tau1", 96]["agree_with_baseline"] == 1.0
    assert (tmp_path / "n.png").stat().st_size > 5000 and "same outcome as ahfa-exact" in (tmp_path / "n.md").read_text()
    assert "wrote" in capsys.readouterr().out
    # a rerun finds every item done
    _run("--model", tiny_llama, "--data-files", book, "--context-lengths", "96,128", "--depths", "0.2,0.8",
         "--trials", 2, "--new-tokens", 3, "--mode", "adaptive", "--tau", "1.0", "--block-size", 16,
         "--device", "cpu", "--out-dir", tmp_path, "--name", "n")
    assert len((tmp_path / "n.jsonl").read_text().splitlines()) == 1 + 16


def test_a_model_that_finds_the_key_scores_one(tiny_llama, book, tmp_path, monkeypatch):
    # the tiny tokenizer has no digits: a stand-in model that answers the one pass key every item hides
    monkeypatch.setattr(needle, "_draw", lambda seed, c, d, t, n: (31337, 0))
    prompts = []
    # digits apart, as some tokenizers decode
    monkeypatch.setattr(needle, "_answer", lambda *args: prompts.append(len(args[3])) or " 3 1 3 3 7.")
    _run("--model", tiny_llama, "--data-files", book, "--context-lengths", "128", "--depths", "0.5",
         "--trials", 3, "--mode", "adaptive", "--baseline", "sdpa", "--device", "cpu", "--out-dir", tmp_path,
         "--name", "p", "--new-tokens", 5)
    assert prompts == [128 - 5] * 6  # prompt and answer fill the context length
    summary = json.loads((tmp_path / "p.json").read_text())["summary"]["by_context"]
    assert [x["accuracy"] for x in summary] == [1.0, 1.0] and all(x["n"] == 3 for x in summary)


@pytest.mark.parametrize("extra, message", [
    (["--depths", "1.5"], "--depths must be fractions"),
    (["--context-lengths", "100000"], "the model takes at most 256 positions"),
    (["--new-tokens", "128"], "--new-tokens 128 leaves no room for a prompt"),
    (["--trials", "0"], "--trials must be at least 1"),
    (["--mode", "exact"], "compares ahfa exact with itself"),
])
def test_bad_input_is_one_line(tiny_llama, book, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_:
        _run("--model", tiny_llama, "--data-files", book, "--device", "cpu", "--out-dir", tmp_path,
             "--context-lengths", "128", *extra)
    err = capsys.readouterr().err  # Transformers' weight-loading progress, then one line
    assert exit_.value.code == 2 and err.strip().splitlines()[-1].startswith("ahfa-eval needle: error: ")
    assert message in err and "Traceback" not in err
