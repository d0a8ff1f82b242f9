"""The texts a perplexity run scores: documents from the dataset hub or local files, their tokens, and
the token each window starts with."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from hf_ahfa.eval.usage import UsageError

# Hub names users type -> (dataset path, config, text column). Any other name goes to load_dataset as is.
HUB_ALIASES = {
    "wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1", "text"),
    "wikitext-2-raw-v1": ("Salesforce/wikitext", "wikitext-2-raw-v1", "text"),
    "wikitext-103-raw-v1": ("Salesforce/wikitext", "wikitext-103-raw-v1", "text"),
    "EleutherAI/wikitext_document_level": ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "page"),
    "pg19": ("emozilla/pg19", None, "text"),
}
FILE_KINDS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
              ".ndjson": "json", ".parquet": "parquet"}
TITLE_COLUMNS = ("title", "short_book_title")


def _keyed_records(paths: list[Path]) -> tuple[list[dict], list[str]] | None:
    """Records and their keys when every file is one JSON object of records keyed by id, else None.

    datasets' JSON loader would read such an object as a single row with one column per key.
    """
    records, keys = [], []
    for path in paths:
        if path.suffix != ".json":
            return None
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:  # JSON lines named .json
            return None
        if not (isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values())):
            return None
        keys += list(obj)
        records += list(obj.values())
    return records, keys


def _local_dataset(args):
    """``(dataset, labels or None, source description, text column)`` of ``--data-files``."""
    import datasets

    paths = [Path(p).expanduser() for p in args.data_files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UsageError(f"--data-files: no such file: {', '.join(missing)}")
    kinds = {FILE_KINDS.get(p.suffix.lower()) for p in paths}
    if len(kinds) != 1 or None in kinds:
        raise UsageError(f"--data-files: expected files of one kind among {sorted(FILE_KINDS)}, got "
                         f"{sorted({p.suffix for p in paths})}")
    kind, files = kinds.pop(), [str(p) for p in paths]
    source, column = ", ".join(p.name for p in paths), args.text_column or "text"
    keyed = _keyed_records(paths) if kind == "json" and not args.json_field else None
    if kind == "text":
        ds = datasets.load_dataset("text", data_files=files, sample_by="document", split="train")
        return ds, [p.name for p in paths], source, column  # sample_by="document": one row per file, in order
    if keyed is not None:
        return datasets.Dataset.from_list(keyed[0]), keyed[1], source, column
    kw = {"field": args.json_field} if args.json_field else {}
    return datasets.load_dataset(kind, data_files=files, split="train", **kw), None, source, column


def _hub_dataset(args):
    """``(dataset, None, source description, text column)`` of ``--dataset`` (an alias or any hub name)."""
    import datasets

    name = args.dataset or ("wikitext" if args.protocol == "wikitext" else "pg19")
    path, config, alias_column = HUB_ALIASES.get(name, (name, None, "text"))
    config = args.dataset_config or config
    source = f"{path}" + (f" ({config})" if config else "") + f", split {args.split}"
    try:
        ds = datasets.load_dataset(path, config, split=args.split)
    except (OSError, ValueError) as e:  # ConnectionError, DatasetNotFoundError, unknown config/split
        first = str(e).splitlines()[0] if str(e) else ""
        raise UsageError(
            f"--dataset {name!r}: cannot load {source} from the Hugging Face hub ({type(e).__name__}: {first}). "
            "Without network, pass local files with --data-files (text, JSON/JSONL or parquet)"
        ) from e
    return ds, None, source, args.text_column or alias_column


def load_documents(args) -> tuple[list[str], list[str], str]:
    """The documents' texts, a label for each (file name, title or index), and a description of the source."""
    ds, labels, source, column = _local_dataset(args) if args.data_files else _hub_dataset(args)
    if column not in ds.column_names:
        hint = "; for JSON with records under a key, pass --json-field KEY" if len(ds.column_names) > 20 else ""
        raise UsageError(f"--text-column {column!r} is not a column of {source}; columns: "
                         f"{ds.column_names[:20]}{hint}")
    if args.max_docs is not None:
        ds = ds.select(range(min(args.max_docs, len(ds))))
    texts = ds[column]
    if texts and not all(t is None or isinstance(t, str) for t in texts):
        raise UsageError(f"--text-column {column!r} of {source} does not hold text")
    texts = [t or "" for t in texts]
    if not any(t.strip() for t in texts):
        raise UsageError(f"no text in {source} (column {column!r}): the data is empty")
    if labels is None:
        title = next((c for c in TITLE_COLUMNS if c in ds.column_names), None)
        labels = [str(t) for t in ds[title]] if title else [f"doc{i}" for i in range(len(texts))]
    return texts, labels[:len(texts)], source


def tokenize(tokenizer, text: str, max_tokens: int | None) -> tuple[list[int], str]:
    """Token ids of ``text`` (one call; special tokens as the tokenizer adds them) and the text they
    cover: all of it, or, cut to ``max_tokens``, up to the end of the last token kept."""
    cut = max_tokens is not None
    enc = tokenizer(text, verbose=False, return_offsets_mapping=cut and tokenizer.is_fast)
    ids = enc["input_ids"]
    if not cut or len(ids) <= max_tokens:
        return ids, text
    if "offset_mapping" in enc:
        return ids[:max_tokens], text[:max(e for _, e in enc["offset_mapping"][:max_tokens])]
    return ids[:max_tokens], tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)


def digest(token_lists: list[list[int]]) -> str:
    """SHA-1 of token lists: the stored configuration changes when the scored tokens do."""
    h = hashlib.sha1()
    for ids in token_lists:
        h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


def joined_books(paths: list[Path]) -> str:
    """The plain-text files ``paths`` as one text, a blank line between them (undecodable bytes replaced)."""
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in paths)


def document_start_token(tokenizer, policy: str = "auto") -> int | None:
    """The token every window begins with (in place of its first token, which is context only and
    never scored), or None.

    A model trained with a document-start token (Gemma's ``<bos>``) degrades badly on windows cut from
    the middle of a text without it. ``auto``: the BOS token if the tokenizer adds it to a text;
    ``bos``: the BOS token always (for tokenizers that lost the setting, e.g. some GGUF conversions);
    ``none``: never.
    """
    bos = tokenizer.bos_token_id
    if policy == "none" or bos is None:
        if policy == "bos":
            raise UsageError("--window-start bos: the tokenizer has no BOS token")
        return None
    if policy == "bos":
        return bos
    ids = tokenizer("a", verbose=False)["input_ids"]
    return bos if ids and ids[0] == bos else None
