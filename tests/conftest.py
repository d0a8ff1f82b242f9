"""Shared test helpers: an independent float64 oracle for attention, and GPU marking."""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter; it is read when a kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("AHFA_TEST_DEVICE"):
    # e.g. AHFA_TEST_DEVICE=cuda runs the Transformers suite on a GPU (tensors made without a device land there)
    torch.set_default_device(os.environ["AHFA_TEST_DEVICE"])


def _visible(Q: int, K: int, causal: bool, window) -> torch.Tensor:
    """Visibility written out from the README's semantics table, one query at a time (no shared code)."""
    ok = torch.zeros(Q, K, dtype=torch.bool)
    for i in range(Q):
        p = i + K - Q  # bottom-right alignment
        for j in range(K):
            allowed = True
            if causal and j > p:
                allowed = False
            if isinstance(window, int):
                allowed = allowed and (p - window < j if causal else abs(p - j) < window)
            elif window is not None:
                left, right = window
                allowed = allowed and p - left <= j <= p + (0 if causal else right)
            ok[i, j] = allowed
    return ok


def oracle_attention(
    q, k, v, *, causal=False, window=None, softcap=None, sinks=None, scale=None,
    key_padding_mask=None, attn_mask=None, cu_seqlens=None, alibi_slopes=None,
):
    """Naive float64 softmax attention in the public layout. Returns ``(out (B,Q,Hq,Dv), lse (B,Hq,Q))``.

    Differentiable w.r.t. q, k, v, sinks. Rows that see no key give zeros and ``lse = -inf``.
    """
    if cu_seqlens is not None:
        cq, ck = cu_seqlens if isinstance(cu_seqlens, tuple) else (cu_seqlens, cu_seqlens)
        outs, lses = [], []
        for s in range(len(cq) - 1):
            a, b, c, d = int(cq[s]), int(cq[s + 1]), int(ck[s]), int(ck[s + 1])
            o, l = oracle_attention(
                q[:, a:b], k[:, c:d], v[:, c:d], causal=causal, window=window, softcap=softcap,
                sinks=sinks, scale=scale,
                key_padding_mask=None if key_padding_mask is None else key_padding_mask[:, c:d],
                attn_mask=None if attn_mask is None else attn_mask[:, :, a:b, c:d],
                alibi_slopes=None if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[s:s + 1],
            )
            outs.append(o)
            lses.append(l)
        return torch.cat(outs, 1), torch.cat(lses, 2)
    B, Q, Hq, D = q.shape
    K, Hkv = k.shape[1], k.shape[2]
    g = Hq // Hkv
    qd = q.double().transpose(1, 2)
    kd = k.double().transpose(1, 2).repeat_interleave(g, dim=1)
    vd = v.double().transpose(1, 2).repeat_interleave(g, dim=1)
    s = qd @ kd.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(D))
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:  # -slope * |query position (bottom-right) - key position|
        distance = (torch.arange(Q)[:, None] + (K - Q) - torch.arange(K)[None, :]).abs().double().to(q.device)
        s = s - alibi_slopes.double().view(-1, Hq, 1, 1) * distance
    ok = _visible(Q, K, causal, window).to(q.device)[None, None]
    if key_padding_mask is not None:
        ok = ok & key_padding_mask[:, None, None, :]
    if attn_mask is not None:
        ok = ok & attn_mask
    ok = ok.expand(B, Hq, Q, K)
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    if sinks is not None:
        col = sinks.double().view(1, Hq, 1, 1).expand(B, Hq, Q, 1)
        p = torch.softmax(torch.cat([s, col], dim=-1), dim=-1)[..., :-1]
    else:
        # softmax of an all -inf row is NaN; such rows see nothing and give zeros
        p = torch.softmax(s.masked_fill(~ok.any(-1, keepdim=True), 0.0), dim=-1) * ok
    out = (p @ vd).transpose(1, 2)
    return out, lse


@pytest.fixture(scope="session")
def oracle():
    return oracle_attention


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run with -m gpu on the accelerator machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------------------------------------- tiny models

TINY_WORDS = [f"w{i}" for i in range(40)] + ["the", "a", "of", "and", "."]


@pytest.fixture(scope="session")
def tiny_text():
    """``make(n_words, seed)``: lines of 5-15 random words of the tiny tokenizer's vocabulary."""

    def make(n_words: int, seed: int) -> str:
        rng = random.Random(seed)
        lines = []
        while n_words > 0:
            k = min(n_words, rng.randint(5, 15))
            lines.append(" ".join(rng.choice(TINY_WORDS) for _ in range(k)))
            n_words -= k
        return "\n".join(lines)

    return make


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A folder with a random 2-layer Llama (256 positions, GQA 4/2) and a word-level tokenizer for the words
    of ``tiny_text``: what the eval tests and the README's examples load."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(TINY_WORDS)], trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def padding_vectors(monkeypatch):
    """ahfa_mask's padding vectors for padded prefills on this CPU too (by default on GPUs only); records, per
    attention call, whether it got a key-padding mask, whether a dense mask, and whether it had one query row."""
    from hf_ahfa import integration

    monkeypatch.setattr(integration, "COMPACT_MASK_DEVICES", frozenset({"cuda", "cpu"}))
    seen, make_call = [], integration.make_call

    def recording(*args, **kwargs):
        seen.append((kwargs["key_padding_mask"] is not None, kwargs["attn_mask"] is not None, args[0].shape[1] == 1))
        return make_call(*args, **kwargs)

    monkeypatch.setattr(integration, "make_call", recording)
    return seen
