"""``ahfa-eval perplexity`` on the CPU: the metric and windowing arithmetic against hand computations, both
protocols end to end on a tiny Llama (with a tokenizer trained here), resuming, and bad input."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

import hf_ahfa  # noqa: F401  (registers "ahfa")
from hf_ahfa.eval import cli, perplexity_data, perplexity_protocols
from hf_ahfa.eval.perplexity_metrics import (
    IGNORE, block_sums, paired_bootstrap, plan_windows, sequence_nll, text_metrics, window_nll,
)

@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


@pytest.fixture
def wiki_json(tmp_path, tiny_text):
    """Wikipedia-summaries style: one JSON object of records keyed by title, text under "extract"."""
    path = tmp_path / "summaries.json"
    records = {f"Article {i}": {"title": f"Article {i}", "extract": tiny_text(50, i)} for i in range(8)}
    path.write_text(json.dumps(records))
    return path


@pytest.fixture
def books(tmp_path, tiny_text):
    """Three books: ~400 tokens, ~100 tokens, and an empty one."""
    paths = []
    for name, n in (("long.txt", 400), ("short.txt", 100), ("empty.txt", 0)):
        paths.append(tmp_path / name)
        paths[-1].write_text(tiny_text(n, len(paths)))
    return paths


def _run(*argv):
    cli.main(["perplexity", *map(str, argv)])


def _usage_error(capsys, message: str, *argv) -> str:
    """Run ``ahfa-eval perplexity ARGV``; check it ends with one line (no traceback) matching ``message``, status 2."""
    with pytest.raises(SystemExit) as exit_:
        _run(*argv)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (progress bars of model loading may come before it)
    assert exit_.value.code == 2 and "Traceback" not in err and last.startswith("ahfa-eval "), err
    assert re.search(message, last), err
    return last


# --------------------------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_nll_against_log_softmax(dtype):
    torch.manual_seed(1)
    logits = (torch.randn(2, 7, 11) * 3).to(dtype)
    targets = torch.randint(0, 11, (2, 7))
    targets[0, :3] = IGNORE
    targets[1, 5] = IGNORE
    logp = torch.log_softmax(logits.double(), -1)
    expected = [-sum(logp[b, t, targets[b, t]].item() for t in range(7) if targets[b, t] != IGNORE) for b in range(2)]
    for budget in (1, 30, 1 << 20):  # one position per chunk, a few, all at once
        nll, count = sequence_nll(logits, targets, budget=budget)
        assert nll.dtype == torch.float64 and count.tolist() == [4, 6]
        torch.testing.assert_close(nll, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)


class NextTokenModel(torch.nn.Module):
    """Predicts token ``(x + 1) % V`` after ``x`` with probability ``p``, the others uniformly."""

    def __init__(self, V=13, p=0.6):
        super().__init__()
        self.V, self.p, self.kept = V, p, []

    def forward(self, input_ids, use_cache=False, logits_to_keep=0):
        self.kept.append(logits_to_keep)
        B, T = input_ids.shape
        logits = torch.full((B, T, self.V), math.log((1 - self.p) / (self.V - 1)))
        logits.scatter_(2, ((input_ids + 1) % self.V)[..., None], math.log(self.p))
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


class NoKeepModel(NextTokenModel):
    def forward(self, input_ids, use_cache=False):  # a model without logits_to_keep gives all logits
        return super().forward(input_ids)


@pytest.mark.parametrize("model_cls", [NextTokenModel, NoKeepModel])
def test_window_nll_on_a_known_distribution(model_cls):
    model = model_cls()
    ids = torch.stack([torch.arange(10), torch.arange(5, 15)]) % model.V
    ids[1, 2] = 0  # a surprise the second window does not score (outside its last 4 tokens)
    nll = window_nll(model, ids, [9, 4])
    assert nll == pytest.approx([-9 * math.log(0.6), -4 * math.log(0.6)], rel=1e-6)
    # perplexity of a source that puts probability p on every next token is 1/p
    assert math.exp(nll[0] / 9) == pytest.approx(1 / 0.6, rel=1e-6)
    if model_cls is NextTokenModel:
        assert model.kept == [10]  # logits for the scored positions (and the last) only
    # a surprise inside the scored part costs -log of the uniform share instead of -log p
    ids[1, 8] = 5  # targets 8 and 9 become unexpected
    surprise = window_nll(model, ids[1:], [4])[0]
    assert surprise == pytest.approx(-2 * math.log(0.6) - 2 * math.log(0.4 / 12), rel=1e-6)


def test_windows_score_every_token_once():
    for n in range(1, 40):
        for L in range(2, 9):
            for stride in range(1, L + 1):
                windows = plan_windows(n, L, stride)
                scored = Counter(t for _, end, s in windows for t in range(s, end))
                assert all(end - begin <= L and begin < s for begin, end, s in windows)
                if stride < L:  # every token but the first, once
                    assert scored == Counter(range(1, n))
                else:  # non-overlapping: the first token of each window is context only
                    assert scored == Counter(t for t in range(1, n) if t % L)


def test_word_perplexity_and_bits_per_byte():
    text = "Größe of the\ncafé"  # 4 words; bytes: Größe 7, " of" 3, " the" 4, "\n" 1, café 5
    m = text_metrics(4 * math.log(3), 8, text)
    assert (m["words"], m["bytes"]) == (4, 20)
    assert m["word_ppl"] == pytest.approx(3)
    assert m["token_ppl"] == pytest.approx(math.sqrt(3))
    assert m["bits_per_byte"] == pytest.approx(4 * math.log2(3) / 20)


# ------------------------------------------------------------------------------------------- end to end


def _hf_guide_nll(model_dir, text, max_length, stride):
    """Hugging Face's perplexity guide, with the model's own loss: (summed NLL, scored tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    ids = AutoTokenizer.from_pretrained(model_dir)(text, return_tensors="pt").input_ids
    nll, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, ids.shape[1], stride):
            end = min(begin + max_length, ids.shape[1])
            window = ids[:, begin:end]
            target = window.clone()
            target[:, :-(end - prev_end)] = -100
            n = int((target[:, 1:] != -100).sum())  # the model shifts labels by one
            nll += model(window, labels=target).loss.item() * n
            count += n
            prev_end = end
            if end == ids.shape[1]:
                break
    return nll, count


def _count_attention_calls(monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    calls = Counter()
    for impl in ("ahfa", "sdpa"):
        fn = ALL_ATTENTION_FUNCTIONS[impl]

        def counted(*args, _fn=fn, _impl=impl, **kwargs):
            calls[_impl] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, impl, counted)
    return calls


def test_wikitext_protocol(tiny_llama, wiki_json, tmp_path, monkeypatch):
    calls = _count_attention_calls(monkeypatch)
    _run("--model", tiny_llama, "--data-files", wiki_json, "--text-column", "extract", "--max-length", 64,
         "--batch-size", 3, "--device", "cpu", "--out-dir", tmp_path, "--name", "wt")
    data = json.loads((tmp_path / "wt.json").read_text())
    md = (tmp_path / "wt.md").read_text()
    s = data["summary"]
    assert data["meta"]["torch"] and data["config"]["max_length"] == 64
    assert data["config"]["attention"] == {"mode": "exact", "variants": [{"label": "ahfa", "mode": "exact"}, {"label": "sdpa"}]}
    assert "PASS" in md and "word ppl" in md
    ours, base = s["impls"]["ahfa"], s["impls"]["sdpa"]
    assert ours["token_ppl"] == pytest.approx(base["token_ppl"], rel=1e-5)
    assert s["verdict"]["pass"] and len(data["rows"]) == 2 * s["windows"]
    # each layer (2) ran once per forward with the implementation asked for: batches of 3 windows
    forwards = math.ceil(s["windows"] / 3)
    assert calls == {"ahfa": 2 * forwards, "sdpa": 2 * forwards}
    text = "\n\n".join(v["extract"] for v in json.loads(wiki_json.read_text()).values())
    nll, count = _hf_guide_nll(tiny_llama, text, 64, 64)
    assert base["tokens"] == count == s["tokens_total"] - s["windows"]
    assert base["nll"] == pytest.approx(nll, rel=1e-5)
    assert ours["word_ppl"] == pytest.approx(math.exp(ours["nll"] / len(text.split())), rel=1e-12)
    assert ours["bits_per_byte"] == pytest.approx(ours["nll"] / len(text.encode()) / math.log(2), rel=1e-12)


def test_wikitext_protocol_strided_from_json_lines(tiny_llama, wiki_json, tmp_path):
    records = list(json.loads(wiki_json.read_text()).values())
    lines = tmp_path / "docs.jsonl"
    lines.write_text("".join(json.dumps({"text": r["extract"]}) + "\n" for r in records))
    _run("--model", tiny_llama, "--data-files", lines, "--max-length", 64, "--stride", 24, "--device", "cpu",
         "--out-dir", tmp_path, "--name", "strided")
    s = json.loads((tmp_path / "strided.json").read_text())["summary"]
    nll, count = _hf_guide_nll(tiny_llama, "\n\n".join(r["extract"] for r in records), 64, 24)
    assert s["impls"]["sdpa"]["tokens"] == count == s["tokens_total"] - 1  # every token but the first
    assert s["impls"]["sdpa"]["nll"] == pytest.approx(nll, rel=1e-5)
    assert s["impls"]["ahfa"]["nll"] == pytest.approx(nll, rel=1e-5)


def test_long_protocol(tiny_llama, books, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _run("--model", tiny_llama, "--protocol", "long", "--data-files", *books, "--context-lengths", "64,128,512",
         "--score-tokens", 32, "--device", "cpu", "--out-dir", tmp_path, "--name", "long")
    data = json.loads((tmp_path / "long.json").read_text())
    assert (tmp_path / "long.md").exists() and (tmp_path / "long.png").stat().st_size > 10_000
    notes = " ".join(data["notes"])
    assert "[512] skipped" in notes and "short.txt" in notes and "1 empty document" in notes
    rows = {(r["title"], r["ctx"], r["impl"]): r for r in data["rows"]}
    assert sorted(rows) == sorted((b, c, i) for b, c in (("long.txt", 64), ("long.txt", 128), ("short.txt", 64))
                                  for i in ("ahfa", "sdpa"))
    # all context lengths of a book end at the same position and score the same 32 tokens
    assert rows["long.txt", 64, "sdpa"]["end"] == rows["long.txt", 128, "sdpa"]["end"] == 128
    for (book, ctx, impl), r in rows.items():
        assert r["tokens"] == 32 and r["ppl"] == pytest.approx(rows[book, ctx, "sdpa"]["ppl"], rel=1e-5)
    # independently: the last 32 tokens of the 64 tokens ending at 128
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager").eval()
    ids = AutoTokenizer.from_pretrained(tiny_llama)(books[0].read_text(), return_tensors="pt").input_ids[:, 64:128]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, -33:-1].double(), -1)
    expected = -logp.gather(1, ids[0, -32:, None]).sum().item()
    assert rows["long.txt", 64, "ahfa"]["nll"] == pytest.approx(expected, rel=1e-5)
    by_ctx = {x["ctx"]: x for x in data["summary"]["by_context"]}
    assert sorted(by_ctx) == [64, 128] and by_ctx[64]["books"] == 2 and data["summary"]["pass"]
    # the scored tokens' NLL in blocks of 64 (here one block of 32) add up to the row's, and the verdict's
    # interval comes from them: ahfa and sdpa agree to rounding here
    assert all(r["nll_blocks"] == [pytest.approx(r["nll"], rel=1e-9)] for r in rows.values())
    lo, hi = by_ctx[64]["verdicts"]["ahfa"]["ci95"]
    assert -1e-5 < lo <= hi < 1e-5
    assert "95% interval" in (tmp_path / "long.md").read_text()


def test_score_tokens_default_is_4096_or_half_the_shortest_context(tiny_llama, books, tmp_path):
    _run("--model", tiny_llama, "--protocol", "long", "--data-files", *books, "--context-lengths", "64,128",
         "--device", "cpu", "--out-dir", tmp_path, "--name", "long")
    assert json.loads((tmp_path / "long.json").read_text())["config"]["score_tokens"] == 32
    assert perplexity_protocols.DEFAULT_SCORE_TOKENS == 4096


def test_block_sums_keep_the_last_partial_block():
    t = torch.arange(150, dtype=torch.float64)
    assert block_sums(t) == [float(t[:64].sum()), float(t[64:128].sum()), float(t[128:].sum())]


def test_paired_bootstrap_interval():
    # the same tokens: no change; a constant shift of every token's NLL: exactly that change
    base = [[10.0] * 8, [5.0, 7.0]]
    assert paired_bootstrap(base, base, [512, 100]) == (0.0, 0.0)
    shifted = [[x + 64 * 0.01 for x in base[0]], [base[1][0] + 0.64, base[1][1] + 0.36]]
    lo, hi = paired_bootstrap(shifted, base, [512, 100])
    assert lo == pytest.approx(math.expm1(0.01)) and hi == pytest.approx(math.expm1(0.01))
    # noisy per-token differences with a known mean: the 95% interval covers it in about 95% of draws and
    # narrows as the scored tokens grow
    gen = torch.Generator().manual_seed(0)
    widths, covered = {}, 0
    for n_tokens in (1024, 16384):
        for trial in range(100 if n_tokens == 1024 else 20):
            books_test, books_base = [], []
            for _ in range(4):
                base_tok = torch.rand(n_tokens, generator=gen, dtype=torch.float64) * 6
                diff = 0.004 + 0.3 * torch.randn(n_tokens, generator=gen, dtype=torch.float64)
                books_base.append(block_sums(base_tok))
                books_test.append(block_sums(base_tok + diff))
            lo, hi = paired_bootstrap(books_test, books_base, [n_tokens] * 4, rounds=1000, seed=trial)
            covered += n_tokens == 1024 and lo <= math.expm1(0.004) <= hi
            widths.setdefault(n_tokens, []).append(hi - lo)
    assert 85 <= covered <= 100
    ratio = sum(widths[1024]) / len(widths[1024]) / (sum(widths[16384]) / len(widths[16384]))
    assert 3 < ratio < 5.5  # 1/sqrt(tokens): 4x narrower for 16x the tokens


def test_resume_skips_finished_items(tiny_llama, books, tmp_path, monkeypatch):
    argv = ["--model", tiny_llama, "--protocol", "long", "--data-files", *books[:2], "--context-lengths", "64,128",
            "--score-tokens", 16, "--device", "cpu"]
    calls = []

    def interrupted(*args, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(args)
        return window_nll(*args, **kw)

    monkeypatch.setattr(perplexity_protocols, "window_nll", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(*argv, "--out-dir", tmp_path / "a")
    assert len((tmp_path / "a" / "perplexity-long.jsonl").read_text().splitlines()) == 1 + 3
    assert not (tmp_path / "a" / "perplexity-long.json").exists()

    calls.clear()
    monkeypatch.setattr(perplexity_protocols, "window_nll", lambda *args, **kw: calls.append(args) or window_nll(*args, **kw))
    _run(*argv, "--out-dir", tmp_path / "a")
    assert len(calls) == 6 - 3  # (long: 64, 128; short: 64) x (ahfa, sdpa), 3 done before
    _run(*argv, "--out-dir", tmp_path / "b")  # uninterrupted
    resumed, fresh = (json.loads((tmp_path / d / "perplexity-long.json").read_text())["rows"] for d in "ab")
    assert {r["key"]: r["nll"] for r in resumed} == pytest.approx({r["key"]: r["nll"] for r in fresh}, rel=1e-12)


# -------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case, extra, message", [
    ("offline hub", ["--dataset", "wikitext"], "--dataset 'wikitext': cannot load .*--data-files"),
    ("unknown dataset", ["--dataset", "someone/no-such-data"], "--dataset 'someone/no-such-data'"),
    ("missing column", ["--data-files", "WIKI", "--text-column", "body"], "--text-column 'body' is not a column"),
    ("too long", ["--data-files", "WIKI", "--text-column", "extract", "--max-length", 512], "--max-length 512"),
    ("mode of sdpa", ["--data-files", "WIKI", "--mode", "adaptive", "--attn", "sdpa", "--baseline", "eager"],
     "--mode adaptive is an ahfa mode"),
    ("tau", ["--data-files", "WIKI", "--mode", "auto", "--tau", "0.9,1.5"], r"--tau must be in \(0, 1\]"),
    ("sample stride", ["--data-files", "WIKI", "--mode", "adaptive", "--sample-stride", 48],
     "--sample-stride.*stride must divide block_size=128, got 48"),
    ("empty", ["--data-files", "EMPTY"], "the data is empty"),
    ("no file", ["--data-files", "nothing.txt"], "--data-files: no such file"),
    ("stride", ["--data-files", "WIKI", "--text-column", "extract", "--max-length", 64, "--stride", 65],
     "--stride 65 is longer than the window"),
    ("same impls", ["--data-files", "WIKI", "--baseline", "sdpa", "--attn", "sdpa"], "--attn and --baseline"),
    ("long too long", ["--protocol", "long", "--data-files", "BOOK", "--context-lengths", "512,1024"],
     r"--context-lengths \[512, 1024\]: all are longer than the model allows \(256\)"),
    ("score too long", ["--protocol", "long", "--data-files", "WIKI", "--text-column", "extract",
                        "--context-lengths", "64", "--score-tokens", 64], "--score-tokens 64"),
])
def test_bad_input_names_the_option(case, extra, message, tiny_llama, tiny_text, wiki_json, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    book = tmp_path / "book.txt"
    book.write_text(tiny_text(300, 0))
    extra = [{"WIKI": wiki_json, "EMPTY": empty, "BOOK": book}.get(x, x) for x in extra]
    _usage_error(capsys, message, "--model", tiny_llama, "--device", "cpu", "--out-dir", tmp_path, *extra)


def test_missing_model_folder(tmp_path, wiki_json, capsys):
    _usage_error(capsys, "--model .*no such folder", "--model", tmp_path / "no-model", "--data-files", wiki_json,
                 "--text-column", "extract")


def test_local_file_formats(books, wiki_json, tmp_path):
    args = SimpleNamespace(data_files=[str(b) for b in books], dataset=None, text_column=None, json_field=None,
                           max_docs=2, protocol="long")
    texts, labels, _ = perplexity_data.load_documents(args)  # text: one document per file, named after it
    assert labels == ["long.txt", "short.txt"] and texts == [b.read_text() for b in books[:2]]

    args.data_files, args.text_column, args.max_docs = [str(wiki_json)], "extract", None
    texts, labels, _ = perplexity_data.load_documents(args)  # an object of records keyed by title
    records = json.loads(wiki_json.read_text())
    assert labels == list(records) and texts == [r["extract"] for r in records.values()]

    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"version": 1, "data": list(records.values())}))
    args.data_files, args.json_field = [str(nested)], "data"
    assert perplexity_data.load_documents(args)[:2] == (texts, labels)


def test_windows_start_with_the_document_start_token():
    import torch

    class Tok:
        bos_token_id = 2

        def __init__(self, adds_bos):
            self.adds_bos = adds_bos

        def __call__(self, text, verbose=False):
            return {"input_ids": ([2] if self.adds_bos else []) + [7]}

    assert perplexity_data.document_start_token(Tok(True)) == 2
    assert perplexity_data.document_start_token(Tok(False)) is None

    seen = []

    def fake_window_nll(model, ids, n_scored, per_token=False):
        seen.append(ids.clone())
        sums = [0.0] * ids.shape[0]
        return (sums, [torch.zeros(n, dtype=torch.float64) for n in n_scored]) if per_token else sums

    protocols = perplexity_protocols
    orig, protocols.window_nll = protocols.window_nll, fake_window_nll
    orig_switch, protocols.switch_attention = protocols.switch_attention, lambda model, impl: None
    try:
        ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
        variant = protocols.Variant("sdpa", "sdpa")
        protocols.timed_nll(None, variant, ids, [2, 2], "cpu", start_token=2)
        protocols.timed_nll(None, variant, ids, [2, 2], "cpu")
    finally:
        protocols.window_nll, protocols.switch_attention = orig, orig_switch
    assert seen[0][:, 0].tolist() == [2, 2] and seen[0][:, 1:].equal(ids[:, 1:])
    assert seen[1].equal(ids) and ids[0, 0] == 5  # the caller's tensor is untouched


def test_window_start_policies():
    from hf_ahfa.eval.perplexity_data import document_start_token

    class Tok:
        bos_token_id = 2

        def __call__(self, text, verbose=False):
            return {"input_ids": [7]}  # this tokenizer does not add its BOS

    assert document_start_token(Tok(), "auto") is None
    assert document_start_token(Tok(), "bos") == 2
    assert document_start_token(Tok(), "none") is None


def test_accelerate_launch_two_processes_match_one(tiny_llama, books, tmp_path):
    # several processes (torchrun, as `accelerate launch` starts them; ACCELERATE_USE_CPU for CPU ones) shard
    # the items; the main process merges them into one report
    import json
    import os
    import subprocess
    import sys

    common = ["--protocol", "long", "--model", str(tiny_llama), "--data-files", *map(str, books),
              "--context-lengths", "16,32", "--score-tokens", "8", "--device", "cpu", "--out-dir", str(tmp_path)]
    _run(*common, "--name", "single")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "-m", "hf_ahfa.eval.cli", "perplexity", *common, "--name", "multi"], check=True, env=env, cwd=tmp_path,
                   capture_output=True)
    single = json.loads((tmp_path / "single.json").read_text())["rows"]
    multi = json.loads((tmp_path / "multi.json").read_text())["rows"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(multi) == strip(single) and len(single) > 2
    assert sorted(p.name for p in tmp_path.glob("multi.rank*.jsonl")) == ["multi.rank0-of-2.jsonl",
                                                                          "multi.rank1-of-2.jsonl"]


def test_adaptive_tau_sweep_long_protocol(tiny_llama, books, tmp_path, monkeypatch):
    # ahfa adaptive (Triton kernels; the interpreter on CPU) against ahfa exact in one run: tau = 1 keeps
    # every block (same perplexity), tau = 0.1 keeps fewer (density < 1, recorded per layer)
    monkeypatch.setenv("AHFA_BACKEND", "triton")
    _run("--model", tiny_llama, "--device", "cpu", "--protocol", "long", "--data-files", books[0],
         "--context-lengths", "256", "--score-tokens", "16", "--mode", "adaptive", "--tau", "1,0.1",
         "--block-size", "32", "--sample-stride", "8", "--baseline", "ahfa", "--out-dir", tmp_path, "--name", "sweep")
    data = json.loads((tmp_path / "sweep.json").read_text())
    tested = [v for v in data["config"]["attention"]["variants"] if v["mode"] == "adaptive"]
    assert [(v["block_size"], v["stride"]) for v in tested] == [(32, 8)] * 2
    (ctx,) = data["summary"]["by_context"]
    assert set(ctx["ppl"]) == {"ahfa-adaptive-tau1", "ahfa-adaptive-tau0.1", "ahfa-exact"}
    assert ctx["ppl"]["ahfa-adaptive-tau1"] == pytest.approx(ctx["ppl"]["ahfa-exact"], rel=1e-5)
    assert ctx["density"]["ahfa-adaptive-tau1"] == 1.0 and ctx["density"]["ahfa-adaptive-tau0.1"] < 1.0
    assert ctx["density"]["ahfa-exact"] is None
    assert set(ctx["layer_density"]["ahfa-adaptive-tau0.1"]) == {"0", "1"}
    assert (tmp_path / "sweep-tau.png").stat().st_size > 0 and "Kept blocks per layer" in (tmp_path / "sweep.md").read_text()


def test_skip_mass_sweep_is_one_variant_per_tau_and_skip_mass(tiny_llama, books, tmp_path, monkeypatch, capsys):
    # --skip-mass 0 is the policy's default (no suffix, no field); a positive one is its own variant, recorded in the
    # report's config; adaptive knobs with --mode exact are refused instead of dropped
    monkeypatch.setenv("AHFA_BACKEND", "triton")
    _run("--model", tiny_llama, "--device", "cpu", "--protocol", "long", "--data-files", books[0],
         "--context-lengths", "256", "--score-tokens", "16", "--mode", "adaptive", "--tau", "1", "--skip-mass",
         "0,0.2", "--block-size", "32", "--sample-stride", "8", "--baseline", "ahfa", "--out-dir", tmp_path,
         "--name", "skip")
    data = json.loads((tmp_path / "skip.json").read_text())
    tested = {v["label"]: v.get("skip_mass") for v in data["config"]["attention"]["variants"] if v["mode"] != "exact"}
    assert tested == {"ahfa-adaptive-tau1": None, "ahfa-adaptive-tau1-skip0.2": 0.2}
    (ctx,) = data["summary"]["by_context"]
    assert ctx["ppl"]["ahfa-adaptive-tau1"] == pytest.approx(ctx["ppl"]["ahfa-exact"], rel=1e-5)
    assert ctx["ppl"]["ahfa-adaptive-tau1-skip0.2"] > 0
    for knob in (["--tau", "0.9"], ["--skip-mass", "0.01"]):
        _usage_error(capsys, f"{knob[0]} set the adaptive mode, which --mode exact does not run", "--model",
                     tiny_llama, "--device", "cpu", "--protocol", "long", "--data-files", books[0], "--mode", "exact",
                     *knob, "--baseline", "sdpa", "--out-dir", tmp_path)
    _usage_error(capsys, "skip_mass must be in", "--model", tiny_llama, "--device", "cpu", "--protocol", "long",
                 "--data-files", books[0], "--mode", "adaptive", "--skip-mass", "1.5", "--baseline", "ahfa",
                 "--out-dir", tmp_path)
    # the reference backend computes every kept tile: a skip-mass variant there would measure nothing
    monkeypatch.delenv("AHFA_BACKEND")
    _usage_error(capsys, "--skip-mass: in-kernel skipping runs on the Triton kernels .* reference backend", "--model",
                 tiny_llama, "--device", "cpu", "--protocol", "long", "--data-files", books[0], "--mode", "adaptive",
                 "--skip-mass", "0.01", "--baseline", "ahfa", "--out-dir", tmp_path)


def test_saved_mode_runs_the_models_own_calibrated_layers(tiny_llama, books, tmp_path, monkeypatch, capsys):
    """--mode saved runs the policy stored in the model's config (per-layer entries, as `ahfa-eval calibrate
    --save-to` writes them) against ahfa exact, whose override turns those entries off; knobs that would change the
    saved policy are refused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("AHFA_BACKEND", "triton")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="ahfa")
    hf_ahfa.configure(model, block_size=32, stride=8, layers=[(1, "adaptive", 0.1)])
    saved = tmp_path / "calibrated"
    model.save_pretrained(saved)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(saved)
    _run("--model", saved, "--device", "cpu", "--protocol", "long", "--data-files", books[0], "--context-lengths",
         "256", "--score-tokens", "16", "--mode", "saved", "--baseline", "ahfa", "--out-dir", tmp_path, "--name", "s")
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["config"]["attention"]["saved_policy"]["layers"] == [[1, "adaptive", 0.1]]
    (ctx,) = data["summary"]["by_context"]
    assert set(ctx["ppl"]) == {"ahfa-saved", "ahfa-exact"}
    assert ctx["density"]["ahfa-saved"] < 1.0 and ctx["density"]["ahfa-exact"] is None
    assert set(ctx["layer_density"]["ahfa-saved"]) == {"1"}  # layer 0 has no entry: the stored mode, exact
    assert not any("layers_max_length" in n for n in data["notes"])
    # entries calibrated up to 128 tokens: a 256-token context runs exact there, and the report says so
    hf_ahfa.configure(model, layers_max_length=128)
    model.save_pretrained(saved)
    _run("--model", saved, "--device", "cpu", "--protocol", "long", "--data-files", books[0], "--context-lengths",
         "256", "--score-tokens", "16", "--mode", "saved", "--baseline", "ahfa", "--out-dir", tmp_path, "--name", "s2")
    data = json.loads((tmp_path / "s2.json").read_text())
    (ctx,) = data["summary"]["by_context"]
    assert ctx["density"]["ahfa-saved"] is None and ctx["ppl"]["ahfa-saved"] == ctx["ppl"]["ahfa-exact"]
    assert any("up to 128 tokens" in n for n in data["notes"]) and "up to 128 tokens" in (tmp_path / "s2.md").read_text()
    _usage_error(capsys, "--mode saved runs the policy stored", "--model", saved, "--device", "cpu", "--protocol",
                 "long", "--data-files", books[0], "--mode", "saved", "--tau", "0.5", "--baseline", "ahfa",
                 "--out-dir", tmp_path)


def test_rerun_with_other_settings_names_the_option_and_files_are_announced(tiny_llama, wiki_json, tmp_path, capsys):
    argv = ["--model", tiny_llama, "--data-files", wiki_json, "--text-column", "extract", "--max-length", 32,
            "--max-docs", 2, "--device", "cpu", "--out-dir", tmp_path, "--name", "same"]
    _run(*argv)
    out = capsys.readouterr().out
    wrote = out.strip().splitlines()[-1]
    assert wrote == "wrote " + ", ".join(str(tmp_path / f"same.{ext}") for ext in ("jsonl", "json", "md"))
    # exact mode has no kept-block share: the column says so
    assert re.search(r"\| ahfa \|.*\| n/a \|", (tmp_path / "same.md").read_text())
    last = _usage_error(capsys, "", *argv[:-4], "--max-docs", 3, "--out-dir", tmp_path, "--name", "same")
    assert "same.jsonl holds results of another configuration (changed: max_docs" in last and "--name" in last


def test_long_verdict_is_given_per_implementation():
    # a tau sweep where one version loses 3% and one nothing: the report names each one's verdict (the run
    # of 2026-12-05 printed one FAIL "at every context length" for a sweep where three of four versions passed)
    from hf_ahfa.eval.perplexity_report import long_markdown

    Variant = perplexity_protocols.Variant
    base, good, bad = (Variant(label, "ahfa", ()) for label in ("exact", "tau0.99", "tau0.9"))
    rows = []
    for ctx in (64, 128):
        for doc in range(3):
            blocks = [190.0 + doc + i for i in range(4)]  # 64 tokens each, about 3 nats per token
            for impl, extra in ((base, 0.0), (good, 0.0), (bad, 64 * 0.03 if ctx == 128 else 0.0)):
                nll = [b + extra for b in blocks]  # bad: 0.03 nats per token more at 128, +3% perplexity
                rows.append(dict(doc=doc, title=f"book{doc}", ctx=ctx, end=128, nll=sum(nll), tokens=256,
                                 ppl=math.exp(sum(nll) / 256), seconds=1.0, nll_blocks=nll, impl=impl.label))
    summary = perplexity_protocols._long_summary(rows, [good, bad], base, [64, 128], 0.01)
    assert summary["failing_contexts"] == {"tau0.99": [], "tau0.9": [128]} and not summary["pass"]
    md = "\n".join(long_markdown(rows, summary, ["tau0.99", "tau0.9"], 256, 0.01))
    assert "**PASS** tau0.99: within 1.00% at every context length." in md
    assert "**FAIL** tau0.9 at 128 tokens (threshold 1.00%)." in md
