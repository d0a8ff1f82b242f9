"""GLUE as data: the task table, the metrics GLUE defines per task, and where the examples come from.

Examples come from the dataset hub (``nyu-mll/glue``, needs network), from local files with GLUE's
column names (CSV/TSV/JSON/JSONL/parquet), or, offline, from the movie-review sentences that ship
with vaderSentiment's source (an SST-2-like binary sentiment set, ``--movie-reviews``).
"""

from __future__ import annotations

import io
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hf_ahfa.eval.usage import UsageError


@dataclass(frozen=True)
class GlueTask:
    name: str
    text_columns: tuple[str, ...]  # one column: single sentence; two: a pair, tokenized as two segments
    num_labels: int  # 1 = regression (STS-B)
    metrics: tuple[str, ...]  # in the order GLUE reports them
    validation_splits: tuple[tuple[str, str], ...]  # (label in the report, split name on the hub)

    @property
    def regression(self) -> bool:
        return self.num_labels == 1


_VAL = (("validation", "validation"),)
TASKS = {t.name: t for t in [
    GlueTask("cola", ("sentence",), 2, ("matthews_correlation",), _VAL),
    GlueTask("sst2", ("sentence",), 2, ("accuracy",), _VAL),
    GlueTask("mrpc", ("sentence1", "sentence2"), 2, ("f1", "accuracy"), _VAL),
    GlueTask("qqp", ("question1", "question2"), 2, ("f1", "accuracy"), _VAL),
    GlueTask("stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearmanr"), _VAL),
    GlueTask("mnli", ("premise", "hypothesis"), 3, ("accuracy",),
             (("matched", "validation_matched"), ("mismatched", "validation_mismatched"))),
    GlueTask("qnli", ("question", "sentence"), 2, ("accuracy",), _VAL),
    GlueTask("rte", ("sentence1", "sentence2"), 2, ("accuracy",), _VAL),
    GlueTask("wnli", ("sentence1", "sentence2"), 2, ("accuracy",), _VAL),
]}
HUB_NAMES = ("nyu-mll/glue", "glue")


def get_task(name: str) -> GlueTask:
    try:
        return TASKS[name]
    except KeyError:
        raise UsageError(f"unknown task {name!r}; choose from {', '.join(TASKS)}") from None


# ---------------------------------------------------------------------------------------------- metrics
# Definitions of evaluate's "glue" module (sklearn's f1_score / matthews_corrcoef, scipy's pearsonr /
# spearmanr), written out in numpy for when that module cannot be loaded (offline: it lives on the hub).

def accuracy(preds, labels) -> float:
    return float((np.asarray(preds) == np.asarray(labels)).mean())


def f1_binary(preds, labels) -> float:
    """F1 of the positive class (label 1); 0 when there is no positive prediction nor label."""
    p, y = np.asarray(preds) == 1, np.asarray(labels) == 1
    tp, fp, fn = int((p & y).sum()), int((p & ~y).sum()), int((~p & y).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews_correlation(preds, labels) -> float:
    """Matthews correlation (multi-class form, as sklearn); 0 when either side is constant."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    classes = np.union1d(preds, labels)
    c = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(c, (np.searchsorted(classes, labels), np.searchsorted(classes, preds)), 1)
    t, p, n = c.sum(1), c.sum(0), c.sum()
    cov_tp = np.trace(c) * n - t @ p
    cov_pp, cov_tt = n * n - p @ p, n * n - t @ t
    return float(cov_tp / np.sqrt(cov_tt * cov_pp)) if cov_tt * cov_pp else 0.0


def pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    den = np.sqrt((xc @ xc) * (yc @ yc))
    return float(xc @ yc / den) if den else float("nan")


def average_ranks(x) -> np.ndarray:
    """Ranks from 1, ties sharing their mean rank (scipy's rankdata 'average')."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return ranks


def spearmanr(x, y) -> float:
    return pearson(average_ranks(x), average_ranks(y))


_BUILTIN = {"accuracy": accuracy, "f1": f1_binary, "matthews_correlation": matthews_correlation,
            "pearson": pearson, "spearmanr": spearmanr}


def builtin_metrics(task: GlueTask, preds, labels) -> dict[str, float]:
    return {m: _BUILTIN[m](preds, labels) for m in task.metrics}


_EVALUATE_CACHE: dict[str, object] = {}


def glue_metric(task: GlueTask):
    """``(compute(preds, labels) -> dict, source)``: evaluate's "glue" module if it loads, else the built-in one."""
    if task.name not in _EVALUATE_CACHE:
        try:
            import evaluate

            _EVALUATE_CACHE[task.name] = evaluate.load("glue", task.name)
        except Exception as e:  # offline (the module lives on the hub), or sklearn/scipy missing
            _EVALUATE_CACHE[task.name] = f"{type(e).__name__}: {e}".splitlines()[0][:160].rstrip(".")
    module = _EVALUATE_CACHE[task.name]
    if isinstance(module, str):
        return (lambda preds, labels: builtin_metrics(task, preds, labels),
                f"built-in (numpy), the definitions of evaluate's glue module, which did not load: {module}")

    def compute(preds, labels):
        out = module.compute(predictions=np.asarray(preds), references=np.asarray(labels))
        return {m: float(out[m]) for m in task.metrics}

    return compute, f"evaluate.load('glue', '{task.name}')"


# ---------------------------------------------------------------------------------------------- data
_BUILDERS = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}), ".json": ("json", {}),
             ".jsonl": ("json", {}), ".parquet": ("parquet", {})}


def load_local(files: list[str], task: GlueTask, role: str):
    """One ``datasets.Dataset`` from local files, each checked for the task's columns and labels."""
    import datasets

    parts = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise UsageError(f"{role} file {f} does not exist")
        suffix = path.suffix.lower()
        if suffix not in _BUILDERS:
            raise UsageError(f"{role} file {f}: unsupported format {suffix!r}; "
                             f"use one of {', '.join(_BUILDERS)}")
        builder, kw = _BUILDERS[suffix]
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kw)
        for col in (*task.text_columns, "label"):
            if col not in ds.column_names:
                raise UsageError(f"{role} file {f} has no column {col!r}; task {task.name} needs "
                                 f"{', '.join((*task.text_columns, 'label'))} (found {', '.join(ds.column_names)})")
        ds = ds.select_columns([*task.text_columns, "label"])
        parts.append(_check_labels(ds, task, f"{role} file {f}"))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _check_labels(ds, task: GlueTask, where: str):
    import datasets

    labels = ds["label"]
    if task.regression:
        try:
            [float(x) for x in labels]
        except (TypeError, ValueError):
            raise UsageError(f"{where}: task {task.name} needs numeric labels") from None
        return ds.cast_column("label", datasets.Value("float32"))
    bad = [x for x in labels if not (isinstance(x, (int, np.integer)) and 0 <= x < task.num_labels)]
    if bad:
        raise UsageError(f"{where}: labels must be integers 0..{task.num_labels - 1} "
                         f"(GLUE's encoding), found {bad[0]!r}")
    return ds.cast_column("label", datasets.Value("int64"))


def load_hub(dataset: str, task: GlueTask):
    """``(train, {label: validation split})`` of a GLUE task from the dataset hub."""
    import datasets

    try:
        dd = datasets.load_dataset(dataset, task.name)
    except Exception as e:
        raise UsageError(
            f"could not load task {task.name!r} of {dataset!r} from the dataset hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Offline, pass local files with "
            f"GLUE's column names (--train-files/--validation-files), or --movie-reviews PATH for an "
            f"SST-2-like set") from None
    cols = [*task.text_columns, "label"]
    return dd["train"].select_columns(cols), {k: dd[s].select_columns(cols) for k, s in task.validation_splits}


def parse_validation_files(items: list[str]) -> dict[str, list[str]]:
    """``PATH`` items form the "validation" set; ``NAME=PATH`` items form the set NAME.

    MNLI from local files: ``matched=dev_matched.tsv mismatched=dev_mismatched.tsv``."""
    sets: dict[str, list[str]] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or Path(item).exists():
            name, path = "validation", item
        sets.setdefault(name, []).append(path)
    return sets


MOVIE_REVIEWS_FILE = "movieReviewSnippets_GroundTruth.txt"


def read_movie_reviews(path: str) -> list[tuple[float, str]]:
    """``(mean sentiment score in [-4, 4], sentence)`` per line of vaderSentiment's movie-review ground truth.

    ``path`` is the text file itself, ``hutto_ICWSM_2014.tar.gz``, or vaderSentiment's source archive
    (``pip download --no-deps --no-binary :all: vaderSentiment==3.3.2``), which holds the former.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--movie-reviews {path} does not exist")
    if p.name.endswith((".tar.gz", ".tgz", ".tar")):
        text = _find_in_tar(p.read_bytes())
        if text is None:
            raise UsageError(f"no {MOVIE_REVIEWS_FILE} inside {path}")
    else:
        text = p.read_bytes()
    rows = []
    for n, line in enumerate(text.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            rows.append((float(parts[1]), parts[2].strip()))
        except (IndexError, ValueError):
            raise UsageError(f"{path} line {n} is not 'id<TAB>score<TAB>sentence'") from None
    return rows


def _find_in_tar(data: bytes) -> bytes | None:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        for m in members:
            if m.name.endswith(MOVIE_REVIEWS_FILE):
                return tar.extractfile(m).read()
        for m in members:  # the sdist holds the data set as a nested archive
            if m.name.endswith((".tar.gz", ".tgz")):
                found = _find_in_tar(tar.extractfile(m).read())
                if found is not None:
                    return found
    return None


def movie_reviews_splits(path: str, validation_fraction: float = 0.2, seed: int = 0):
    """SST-2-like ``(train, validation)`` Datasets (``sentence``, ``label`` = score > 0; zero scores dropped),
    split by a shuffle with a fixed seed, so every run and machine gets the same split."""
    import datasets

    rows = [(s, text) for s, text in read_movie_reviews(path) if s != 0]
    random.Random(seed).shuffle(rows)
    n_val = round(len(rows) * validation_fraction)

    def to_ds(part):
        return datasets.Dataset.from_dict({"sentence": [t for _, t in part], "label": [int(s > 0) for s, _ in part]})

    return to_ds(rows[n_val:]), to_ds(rows[:n_val])


def take(ds, n: int | None):
    """At most ``n`` examples, drawn by a fixed-seed shuffle (a sorted file still gives every class)."""
    return ds if n is None or n >= len(ds) else ds.shuffle(seed=0).select(range(n))
