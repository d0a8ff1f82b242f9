"""Attention recorded from a real model reading real text, for the studies in ``scripts/`` (estimator, tile
skipping): the options naming the model and the books, and one causal prefill per book that hands every global
layer's attention inputs to a function (sliding-window layers are left out: the adaptive mode keeps their band)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch


def add_recording_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """``--model``, ``--gguf-file``, ``--books``, ``--tokens``, ``--out-dir`` and ``--name`` (default ``name``)."""
    parser.add_argument("--model", required=True, help="a model folder (or a folder holding --gguf-file)")
    parser.add_argument("--gguf-file", help="GGUF weights in --model's folder (de-quantized to float32)")
    parser.add_argument("--books", nargs="+", required=True, help="plain-text files; one prefill per book")
    parser.add_argument("--tokens", type=int, default=4096, help="prefill length (from each book's start)")
    parser.add_argument("--out-dir", type=Path)
    parser.add_argument("--name", default=name)


def record_prefills(args, on_layer: Callable, model=None, tokenizer=None) -> set[int]:
    """Run one causal prefill of ``args.tokens`` tokens per book (float32, CPU) and call ``on_layer(module, query,
    key, value, **kwargs)`` with each global layer's Transformers attention inputs (``query (B, H, T, D)``); the
    layers' attention itself is computed by sdpa. ``model`` / ``tokenizer``: already loaded ones (default: load
    ``args.model``). Returns the indices of the layers recorded."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from hf_ahfa.eval.runs import load_causal_lm

    if model is None:
        model, tokenizer = load_causal_lm(args.model, "sdpa", torch.float32, "cpu", args.gguf_file)
    recorded = set()

    def recording(module, query, key, value, attention_mask, **kw):
        if kw.get("sliding_window") is None:
            recorded.add(module.layer_idx)
            on_layer(module, query, key, value, **kw)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("ahfa-recording", recording)
    model.set_attn_implementation("ahfa-recording")
    with torch.inference_mode():
        for book in args.books:
            ids = tokenizer(Path(book).read_text(encoding="utf-8"), return_tensors="pt").input_ids[:, :args.tokens]
            if ids.shape[1] < args.tokens:
                raise SystemExit(f"{book}: {ids.shape[1]} tokens, fewer than --tokens {args.tokens}")
            model(ids, use_cache=False)
            print(f"{book}: done", flush=True)
    return recorded
