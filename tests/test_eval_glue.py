"""``ahfa-eval glue`` on the CPU: a tiny BERT and tokenizer made here, tiny local data sets, no downloads."""

from __future__ import annotations

import csv
import io
import json
import random
import re
import tarfile

import numpy as np
import pytest

from hf_ahfa.eval import glue
from hf_ahfa.eval.cli import main
from hf_ahfa.eval.usage import UsageError
from hf_ahfa.eval.glue_tasks import (TASKS, average_ranks, builtin_metrics, f1_binary, matthews_correlation,
                                     movie_reviews_splits, parse_validation_files, pearson, spearmanr)

POS = "good great fun lovely brilliant".split()
NEG = "bad awful boring dull terrible".split()
FILL = "the movie was a plot acting film story and it".split()
WORDS = POS + NEG + FILL


def _sentence(rng, label):
    return " ".join(rng.sample(FILL, 3) + [rng.choice(POS if label else NEG)] + rng.sample(FILL, 2))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer BERT (random weights) and a BERT tokenizer whose vocabulary is the test sentences' words."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(str(path / "vocab.txt")).save_pretrained(path)
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(path)
    return path


def _write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    return path


def _sst2_files(tmp_path, n_train=32, n_val=16):
    rng = random.Random(0)
    rows = [{"sentence": _sentence(rng, i % 2), "label": i % 2} for i in range(n_train + n_val)]
    return _write(tmp_path / "train.csv", rows[:n_train]), _write(tmp_path / "val.jsonl", rows[n_train:])


def _pair_rows(rng, n, regression=False):
    rows = []
    for i in range(n):
        same = i % 2
        a = _sentence(rng, 1)
        b = a if same else _sentence(rng, 0)
        rows.append({"sentence1": a, "sentence2": b, "label": float(rng.uniform(3, 5) if same else rng.uniform(0, 2))
                     if regression else same})
    return rows


def _usage_error(capsys, message: str, argv: list[str]) -> str:
    """Run ``ahfa-eval ARGV``; check it ends with one line (no traceback) matching ``message``, status 2."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (progress bars of model loading may come before it)
    assert exit_.value.code == 2 and "Traceback" not in err and last.startswith("ahfa-eval "), err
    assert re.search(message, last), err
    return last


def _args(model, tmp_path, *extra):
    return ["glue", "--model", str(model), "--out-dir", str(tmp_path / "out"), "--epochs", "1", "--batch-size", "8",
            "--max-length", "32", "--lr", "1e-3", *extra]


@pytest.fixture
def count_trainings(monkeypatch):
    calls = []
    real = glue._fine_tune

    def counted(ctx, impl, seed, output_dir):
        calls.append((impl, seed))
        return real(ctx, impl, seed, output_dir)

    monkeypatch.setattr(glue, "_fine_tune", counted)
    return calls


# ---------------------------------------------------------------------------------------------- end to end
def test_single_sentence_both_comparisons(tiny_model, tmp_path, count_trainings):
    train, val = _sst2_files(tmp_path)
    main(_args(tiny_model, tmp_path, "--task", "sst2", "--train-files", str(train), "--validation-files", str(val),
               "--seeds", "0,1", "--name", "sst2-tiny"))
    # comparison b's sdpa run of seed 0 is comparison a's fine-tuning: 1 + 3 trainings, not 5
    assert sorted(count_trainings) == [("ahfa", 0), ("ahfa", 1), ("sdpa", 0), ("sdpa", 1)]
    data = json.loads((tmp_path / "out" / "sst2-tiny.json").read_text())
    assert data["meta"]["torch"] and data["config"]["task"] == "sst2" and data["config"]["n_train"] == 32
    assert {r["key"] for r in data["rows"]} == {"a/sdpa/seed0", "a/ahfa/seed0", "b/sdpa/seed0", "b/ahfa/seed0",
                                                "b/sdpa/seed1", "b/ahfa/seed1"}
    a = data["summary"]["a"]
    # one checkpoint, two attention implementations: the same metric, the same predictions
    assert a["metrics"]["accuracy"]["ahfa"] == a["metrics"]["accuracy"]["baseline"]
    assert a["metrics"]["accuracy"]["pass"] and a["prediction_agreement"] == 1.0
    assert a["max_abs_logit_diff"] < 1e-4
    b = data["summary"]["b"]["metrics"]["accuracy"]
    assert b["baseline_std"] is not None and len(b["ahfa_values"]) == 2 and isinstance(b["within_seed_noise"], bool)
    md = (tmp_path / "out" / "sst2-tiny.md").read_text()
    assert "## a. One checkpoint" in md and "evaluated with both" in md and "## b. Fine-tuned with each implementation, seeds 0, 1" in md
    assert "PASS" in md and "±" in md
    assert not (tmp_path / "out" / "sst2-tiny-work").exists()  # checkpoints removed after a finished run


def test_pair_task_end_to_end(tiny_model, tmp_path, capsys):
    rows = _pair_rows(random.Random(1), 40)
    train, val = _write(tmp_path / "train.tsv", rows[:24]), _write(tmp_path / "val.csv", rows[24:])
    main(_args(tiny_model, tmp_path, "--task", "mrpc", "--train-files", str(train), "--validation-files",
               str(val), "--comparisons", "a", "--seeds", "0"))
    out = tmp_path / "out"
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote {out / 'glue-mrpc.json'}, {out / 'glue-mrpc.md'}"
    data = json.loads((tmp_path / "out" / "glue-mrpc.json").read_text())
    metrics = data["summary"]["a"]["metrics"]
    assert set(metrics) == {"f1", "accuracy"}
    assert all(m["ahfa"] == m["baseline"] for m in metrics.values())
    assert data["config"]["n_eval"] == {"validation": 16}


def test_pair_tokenization_gives_two_segments(tiny_model):
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ds = datasets.Dataset.from_list(_pair_rows(random.Random(2), 4))
    out = glue._tokenize(ds, tok, TASKS["mrpc"], 32)
    assert set(out.column_names) == {"input_ids", "token_type_ids", "attention_mask", "label"}
    for ids, types, row in zip(out["input_ids"], out["token_type_ids"], ds):
        assert set(types) == {0, 1}
        sep = tok.sep_token_id
        assert ids.count(sep) == 2 and types.index(1) == ids.index(sep) + 1  # segment B starts after the first [SEP]
        assert len(ids) == 2 + 1 + len(row["sentence1"].split()) + len(row["sentence2"].split())
    single = glue._tokenize(ds.rename_column("sentence1", "sentence"), tok, TASKS["sst2"], 32)
    assert all(set(t) == {0} for t in single["token_type_ids"])


def test_stsb_regression(tiny_model, tmp_path):
    rows = _pair_rows(random.Random(3), 32, regression=True)
    train, val = _write(tmp_path / "train.jsonl", rows[:20]), _write(tmp_path / "val.jsonl", rows[20:])
    main(_args(tiny_model, tmp_path, "--task", "stsb", "--train-files", str(train), "--validation-files", str(val),
               "--comparisons", "a", "--seeds", "0"))
    data = json.loads((tmp_path / "out" / "glue-stsb.json").read_text())
    metrics = data["summary"]["a"]["metrics"]
    assert set(metrics) == {"pearson", "spearmanr"}
    # regression outputs differ by rounding only; a barely trained head spreads them little, so the
    # correlation moves by more than the outputs do
    assert data["summary"]["a"]["max_abs_logit_diff"] < 1e-5
    assert all(-1 <= m["ahfa"] <= 1 and m["ahfa"] == pytest.approx(m["baseline"], rel=1e-3) for m in metrics.values())
    assert data["summary"]["a"]["prediction_agreement"] is None
    assert data["rows"][0]["train_loss"] > 0  # mean squared error of a one-output head


def test_resume_after_interruption(tiny_model, tmp_path, monkeypatch):
    train, val = _sst2_files(tmp_path)
    argv = _args(tiny_model, tmp_path, "--task", "sst2", "--train-files", str(train), "--validation-files", str(val),
                 "--comparisons", "b", "--seeds", "0", "1")
    calls, real = [], glue._fine_tune

    def interrupted(ctx, impl, seed, output_dir):
        calls.append((impl, seed))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(ctx, impl, seed, output_dir)

    monkeypatch.setattr(glue, "_fine_tune", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert not (tmp_path / "out" / "glue-sst2.json").exists()
    calls.clear()
    main(argv)
    assert calls == [("sdpa", 1), ("ahfa", 1)]  # seed 0 was finished before the interruption
    calls.clear()
    main(argv[:-2] + ["0,1,2"])  # one more seed: only its two runs
    assert calls == [("sdpa", 2), ("ahfa", 2)]
    data = json.loads((tmp_path / "out" / "glue-sst2.json").read_text())
    assert data["summary"]["b"]["seeds"] == [0, 1, 2] and len(data["rows"]) == 6


def test_interrupted_after_fine_tuning_reuses_the_checkpoint(tiny_model, tmp_path, monkeypatch, count_trainings):
    train, val = _sst2_files(tmp_path)
    argv = _args(tiny_model, tmp_path, "--task", "sst2", "--train-files", str(train), "--validation-files", str(val),
                 "--comparisons", "a", "--seeds", "0")
    real = glue.Context.predict

    def fails(self, trainer):
        raise KeyboardInterrupt

    monkeypatch.setattr(glue.Context, "predict", fails)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert (tmp_path / "out" / "glue-sst2-work" / "a-sdpa-seed0" / "final" / "train_stats.json").exists()
    monkeypatch.setattr(glue.Context, "predict", real)
    main(argv)
    assert count_trainings == [("sdpa", 0)]  # the evaluation resumed from the saved checkpoint
    assert len(json.loads((tmp_path / "out" / "glue-sst2.json").read_text())["rows"]) == 2


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_against_hand_computed_values():
    preds, labels = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]
    # tp 2, fp 1, fn 1, tn 2
    assert builtin_metrics(TASKS["sst2"], preds, labels) == {"accuracy": pytest.approx(4 / 6)}
    assert f1_binary(preds, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert matthews_correlation(preds, labels) == pytest.approx((2 * 2 - 1 * 1) / 3 / 3)  # sqrt(3*3*3*3)
    assert matthews_correlation([1, 1, 1], [0, 1, 1]) == 0.0  # constant predictions
    assert f1_binary([0, 0], [0, 0]) == 0.0
    # 3 classes: C = [[2,0,0],[1,1,0],[0,1,1]]; n=6, trace 4, t=(2,2,2), p=(3,2,1)
    mcc3 = (4 * 6 - (2 * 3 + 2 * 2 + 2 * 1)) / np.sqrt((36 - 12) * (36 - (9 + 4 + 1)))
    assert matthews_correlation([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2]) == pytest.approx(mcc3)
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 4.0]
    # x - 2.5 = (-1.5,-.5,.5,1.5), y - 3.75 = (-1.75,.25,1.25,.25): cov 3.5, |x| sqrt(5), |y| sqrt(4.75)
    assert pearson(x, y) == pytest.approx(3.5 / np.sqrt(5 * 4.75))
    assert list(average_ranks([10, 30, 20, 30])) == [1.0, 3.5, 2.0, 3.5]
    assert spearmanr(x, y) == pytest.approx(pearson([1, 2, 3, 4], [1, 2.5, 4, 2.5]))
    assert set(builtin_metrics(TASKS["stsb"], x, y)) == {"pearson", "spearmanr"}
    assert set(builtin_metrics(TASKS["cola"], preds, labels)) == {"matthews_correlation"}


def test_metrics_match_sklearn_and_scipy_when_installed():
    metrics = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert f1_binary(p, y) == pytest.approx(metrics.f1_score(y, p))
    assert matthews_correlation(p, y) == pytest.approx(metrics.matthews_corrcoef(y, p))
    y3, p3 = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    assert matthews_correlation(p3, y3) == pytest.approx(metrics.matthews_corrcoef(y3, p3))
    a, b = rng.normal(size=100), rng.integers(0, 6, 100).astype(float)  # ties in b
    assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0])
    assert spearmanr(a, b) == pytest.approx(stats.spearmanr(a, b)[0])


# ---------------------------------------------------------------------------------------------- data
def test_movie_reviews_from_nested_archive(tmp_path):
    lines = [f"{i}\t{s}\tsentence number {i}\r\n" for i, s in enumerate([2.5, -1.0, 0.0, 0.4, -3.2] * 4, 1)]
    data = "".join(lines).encode()
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as t:
        info = tarfile.TarInfo("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    sdist = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    with tarfile.open(sdist, "w:gz") as t:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(inner.getvalue())
        t.addfile(info, io.BytesIO(inner.getvalue()))
    train, val = movie_reviews_splits(str(sdist))
    assert (len(train), len(val)) == (13, 3)  # 16 non-zero scores, 20% held out
    text = {r["sentence"]: r["label"] for r in [*train, *val]}
    assert text["sentence number 1"] == 1 and text["sentence number 2"] == 0 and "sentence number 3" not in text
    (tmp_path / "plain.txt").write_bytes(data)
    again = movie_reviews_splits(str(tmp_path / "plain.txt"))
    assert again[0]["sentence"] == train["sentence"] and again[1]["sentence"] == val["sentence"]  # deterministic


def test_hub_data_and_offline_error(monkeypatch):
    import datasets

    from hf_ahfa.eval.glue_tasks import load_hub

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UsageError, match=r"could not load task 'sst2' of 'nyu-mll/glue'.*--train-files.*--movie-"):
        load_hub("nyu-mll/glue", TASKS["sst2"])
    row = {"premise": "p", "hypothesis": "h", "label": 2, "idx": 0}
    fake = datasets.DatasetDict({s: datasets.Dataset.from_list([row]) for s in
                                 ("train", "validation_matched", "validation_mismatched", "test_matched")})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or fake)
    train, evals = load_hub("glue", TASKS["mnli"])
    assert calls == [("glue", "mnli")] and set(evals) == {"matched", "mismatched"}
    assert train.column_names == evals["matched"].column_names == ["premise", "hypothesis", "label"]


def test_validation_file_sets():
    assert parse_validation_files(["a.csv", "b.csv"]) == {"validation": ["a.csv", "b.csv"]}
    assert parse_validation_files(["matched=m.tsv", "mismatched=mm.tsv"]) == {"matched": ["m.tsv"],
                                                                               "mismatched": ["mm.tsv"]}


# ---------------------------------------------------------------------------------------------- bad input
def test_unknown_task(capsys):
    with pytest.raises(SystemExit):
        main(["glue", "--task", "squad", "--model", "x"])
    assert "invalid choice: 'squad'" in capsys.readouterr().err


def test_missing_column_names_column_and_file(tiny_model, tmp_path, capsys):
    train = _write(tmp_path / "nosentence.csv", [{"text": "good movie", "label": 1}])
    _, val = _sst2_files(tmp_path)
    _usage_error(capsys, r"train file .*nosentence\.csv has no column 'sentence'.*found text, label",
                 _args(tiny_model, tmp_path, "--task", "sst2", "--train-files", str(train), "--validation-files", str(val)))
    pair = _write(tmp_path / "pair.csv", [{"sentence1": "good", "label": 1}])
    _usage_error(capsys, r"pair\.csv has no column 'sentence2'",
                 _args(tiny_model, tmp_path, "--task", "rte", "--train-files", str(pair), "--validation-files", str(pair)))


def test_bad_labels_and_missing_file(tiny_model, tmp_path, capsys):
    bad = _write(tmp_path / "bad.csv", [{"sentence": "good", "label": "positive"}])
    _usage_error(capsys, r"bad\.csv: labels must be integers 0\.\.1",
                 _args(tiny_model, tmp_path, "--task", "sst2", "--train-files", str(bad), "--validation-files", str(bad)))
    train, _ = _sst2_files(tmp_path)
    _usage_error(capsys, r"validation file .*nope\.csv does not exist",
                 _args(tiny_model, tmp_path, "--task", "sst2", "--train-files", str(train), "--validation-files",
                       str(tmp_path / "nope.csv")))


def test_bad_model_and_options(tiny_model, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    train, val = _sst2_files(tmp_path)
    data = ["--task", "sst2", "--train-files", str(train), "--validation-files", str(val)]
    _usage_error(capsys, r"model path .*no-such-model does not exist", _args(tmp_path / "no-such-model", tmp_path, *data))
    _usage_error(capsys, r"--max-length 100 is above the 64 positions",
                 _args(tiny_model, tmp_path, *data, "--max-length", "100"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    _usage_error(capsys, r"could not load model 'no-org/no-model' \(no such local folder, and the hub",
                 _args("no-org/no-model", tmp_path, *data))
    _usage_error(capsys, "pass --model", ["glue", "--task", "sst2"])


def test_two_processes_fine_tune_data_parallel(tiny_model, tmp_path):
    # torchrun (what `accelerate launch` starts; ACCELERATE_USE_CPU for CPU processes): Trainer runs each
    # fine-tuning data-parallel, and the main process alone writes the store and the report
    import os
    import subprocess
    import sys

    train, val = _sst2_files(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    args = _args(tiny_model, tmp_path, "--task", "sst2", "--train-files", str(train), "--validation-files", str(val),
                 "--seeds", "0", "--name", "ddp")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                           "hf_ahfa.eval.cli", *args], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, "\n".join(l for l in proc.stderr.splitlines() if "rank1" in l)[-3000:]
    data = json.loads((tmp_path / "out" / "ddp.json").read_text())
    assert {r["key"] for r in data["rows"]} == {"a/sdpa/seed0", "a/ahfa/seed0", "b/sdpa/seed0", "b/ahfa/seed0"}
    assert data["summary"]["a"]["prediction_agreement"] == 1.0
    assert len((tmp_path / "out" / "ddp.jsonl").read_text().splitlines()) == 1 + 4  # one writer: no duplicate rows
