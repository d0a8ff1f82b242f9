"""The adaptive policy: when ahfa computes attention block-sparse, and how.

Set it in one of two places (both documented in the README):

* per model, persisted: ``hf_ahfa.configure(model, mode="auto", tau=0.95)`` stores the policy in the
  model's config (``config.ahfa``), which ``save_pretrained`` writes and ``from_pretrained`` reads back;
* per call: ``with hf_ahfa.override(mode="exact"): model(...)`` wins over the model's setting.

Without either, ``AdaptivePolicy()``'s defaults apply: mode ``exact`` (sparsity is opt-in: on a 0.5B model
it had not seen, tau 0.99 changed perplexity by +1.9% at 32K, issue 12, and where the selection keeps most
blocks the estimator alone cost a dense model 14% at 32K on an H200,
``eval/results/model-speed-qwen2-0.5b-auto-h200.md``). The other defaults come from the measurements in
``eval/results/`` (H100, SmolLM2-135M and Gemma-3-270m on four novels): ``tau = 0.99`` is the lowest
target that kept perplexity within 0.5% of exact at every length measured there (0.98 lost up to 1.1% on
Gemma-3 at 32K); ``auto`` starts at 16K tokens, where block-sparse attention at that tau became faster
than exact on SmolLM2 (1.30x at 16K, 0.66x at 8K); on Gemma-3's head-dim-256 global layers it stayed
slower (0.76-0.95x) up to 32K. Those runs selected blocks by the mean of each query block's sampled rows; the
selection now keeps every sampled row's blocks (``hf_ahfa.select``), more blocks at the same ``tau``
(SmolLM2 at 4K, tau 0.99: 0.77 of the blocks instead of 0.65, ``eval/results/estimator-study-v2-*.md``).
On an H100 with 4096 scored tokens per book, this selection kept every book of Gemma-3-270m within 0.07% of
exact at 8K-32K with tau 0.99 (0.29% at 0.98, 0.61% at 0.95) while keeping 91-98% of the blocks
(``eval/results/ppl-adaptive-gemma3-h100.md``): the defaults stand.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, fields, replace

import torch

MODES = ("exact", "adaptive", "auto", "pattern")


@dataclass(frozen=True)
class AdaptivePolicy:
    """How the adaptive mode runs.

    Attributes:
        mode: ``"exact"`` always dense; ``"adaptive"`` block-sparse for every prefill of at least two
            blocks; ``"auto"`` block-sparse only where it pays: from ``min_length`` query rows on, on the
            Triton kernels, and only where the block-sparse call (estimator and selection included) was timed
            faster than exact attention, once per model layer and call shape on the GPU (its first call),
            exact otherwise.
            Decode steps (few queries) always run exact. ``"pattern"``: the fixed sparse ``pattern`` below, for every call.
        tau: per head, each sampled query row's fewest key blocks that hold ``tau`` of its attention mass
            are kept for the row's query block (``1.0`` keeps every visible block: exact results through the
            sparse kernel).
        block_size: query and key block edge in tokens (a multiple of the kernels' tiles: 128 on GPUs).
        stride: the estimator computes the exact attention of every ``stride``-th query row (divides
            ``block_size``); its cost is ``2 / stride`` of the ``Q K^T`` product.
        sink_blocks: leading key blocks always kept (attention sinks).
        local_blocks: key blocks up to and including each query block's diagonal always kept.
        density_limit: a head whose selection keeps more than this share of its visible blocks runs
            all of them (the estimate says the head is dense: skipping buys little and risks quality).
        min_length: ``auto`` switches to block-sparse from this many query rows.
        skip_mass: inference on the Triton kernels only: inside the kept blocks, skip the P @ V product of
            tiles far below each row's running maximum while every row of the tile has left out at most this
            share of its attention mass (an upper bound, counted against the mass seen so far); the output
            is exact attention over the keys kept, off by at most ``2 * skip_mass * max|v|``. 0 (default):
            every kept block is computed. Ignored where a gradient is needed.
        pattern: a fixed sparse pattern of ``hf_ahfa.patterns`` in blocks of ``block_size``, used where the
            mode is ``"pattern"``: factories joined by ``+``, e.g. ``"local:width=2+global_blocks:n=1"``. It
            is the model's attention, not an approximation: every call runs it (prefill and decode),
            block-sparse; packed sequences and dense masks (padded batches) are refused.
        layers: per-layer settings that win over ``mode`` and ``tau`` for those layers: ``(layer index,
            mode, tau)`` triples (``hf_ahfa.calibrate`` writes them); layers not listed use the fields above.
        layers_max_length: the longest context (keys, cache included) the ``layers`` entries hold for; a call
            over more keys runs the fields above instead (0: any length). ``hf_ahfa.calibrate`` sets it to its
            longest sample: its bound was measured up to there, not beyond.
    """

    mode: str = "exact"
    tau: float = 0.99
    block_size: int = 128
    stride: int = 16
    sink_blocks: int = 1
    local_blocks: int = 2
    density_limit: float = 0.8
    min_length: int = 16384
    skip_mass: float = 0.0
    pattern: str = ""
    layers: tuple[tuple[int, str, float], ...] = ()
    layers_max_length: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        if self.block_size < 16 or self.block_size % 16:
            raise ValueError(f"block_size must be a positive multiple of 16, got {self.block_size}")
        if self.stride < 1 or self.block_size % self.stride:
            raise ValueError(f"stride must divide block_size={self.block_size}, got {self.stride}")
        if self.sink_blocks < 0 or self.local_blocks < 1:
            raise ValueError(f"sink_blocks must be >= 0 and local_blocks >= 1, got {self.sink_blocks}, "
                             f"{self.local_blocks}")
        if not 0.0 < self.density_limit <= 1.0:
            raise ValueError(f"density_limit must be in (0, 1], got {self.density_limit}")
        if self.min_length < 1:
            raise ValueError(f"min_length must be >= 1, got {self.min_length}")
        if not 0.0 <= self.skip_mass < 1.0:
            raise ValueError(f"skip_mass must be in [0, 1), got {self.skip_mass}")
        try:  # JSON (config.ahfa) gives lists: kept as tuples, so that the policy stays hashable
            layers = tuple((int(i), str(m), float(t)) for i, m, t in self.layers)
        except (TypeError, ValueError):
            raise ValueError(f"layers must be (layer index, mode, tau) triples, got {self.layers!r}") from None
        for i, m, t in layers:
            if i < 0 or m not in MODES or not 0.0 < t <= 1.0:
                raise ValueError(f"layers entry ({i}, {m!r}, {t}): needs an index >= 0, a mode in {MODES} "
                                 f"and tau in (0, 1]")
        if len({i for i, _, _ in layers}) != len(layers):
            raise ValueError(f"layers lists a layer index twice: {layers}")
        if isinstance(self.layers_max_length, bool) or not isinstance(self.layers_max_length, int) \
                or self.layers_max_length < 0:
            raise ValueError(f"layers_max_length must be an int >= 0 (0: any length), got {self.layers_max_length!r}")
        object.__setattr__(self, "layers", layers)
        if self.pattern or "pattern" in (self.mode, *(m for _, m, _ in layers)):
            from hf_ahfa.patterns import parse

            parse(self.pattern)  # raises naming the part

    def for_layer(self, index: int | None, keys: int | None = None) -> AdaptivePolicy:
        """The policy of layer ``index`` for a call over ``keys`` keys: its ``layers`` entry's mode and tau,
        else (no entry, or more keys than ``layers_max_length``) this policy."""
        if self.layers_max_length and keys is not None and keys > self.layers_max_length:
            return self
        # every attention call of a calibrated model asks: the per-layer policies are built once per policy
        # (not while torch.compile traces, which runs this once per graph and cannot trace the cache)
        compiling = torch.compiler.is_compiling()
        by_layer = None if compiling else self.__dict__.get("_by_layer")
        if by_layer is None:
            by_layer = {i: replace(self, mode=mode, tau=tau, layers=()) for i, mode, tau in self.layers}
            if not compiling:
                object.__setattr__(self, "_by_layer", by_layer)
        return by_layer.get(index, self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> AdaptivePolicy:
        unknown = set(values) - _FIELD_NAMES
        if unknown:
            raise ValueError(f"unknown ahfa policy field(s) {sorted(unknown)}; known: {sorted(_FIELD_NAMES)}")
        return cls(**values)


# Read once: torch.compile cannot trace dataclasses.fields(), and policy_of runs inside compiled models.
_FIELD_NAMES = frozenset(f.name for f in fields(AdaptivePolicy))
_DEFAULT = AdaptivePolicy()

# A plain module global, not a ContextVar: torch.compile traces reading it (and guards on it, so a model compiled
# inside ``override`` recompiles outside it); a ContextVar would break ``fullgraph=True``. Process-wide.
_override: dict | None = None
# policy_of's reuse: id(config.ahfa) -> (a copy of it, the override then, the policy built from both)
_built: dict[int, tuple[dict, dict | None, AdaptivePolicy]] = {}


def configure(model, **fields_) -> AdaptivePolicy:
    """Set the policy of ``model`` (a PreTrainedModel or its config) and return it.

    Fields not given keep the model's current value (or the default). Stored as ``config.ahfa`` on the
    model's config and on every sub-config its attention layers read, so it is saved with the model.
    """
    configs = _configs_of(model)
    policy = replace(policy_of(configs[0]), **fields_)
    for config in configs:
        config.ahfa = policy.to_dict()
    return policy


@contextlib.contextmanager
def override(**fields_):
    """Within the block, these policy fields win over every model's own (nested blocks merge). A ``mode`` or
    ``tau`` given without ``layers`` also wins over a calibrated model's per-layer entries (``layers``, which
    carry a mode and tau per layer): ``override(mode="exact")`` makes every layer exact."""
    global _override
    outer = _override
    merged = {**(outer or {}), **fields_}
    if ("mode" in fields_ or "tau" in fields_) and "layers" not in fields_:
        merged["layers"] = ()
    AdaptivePolicy.from_dict(merged)  # raise here on unknown or invalid fields, not inside a model
    _override = merged
    try:
        yield
    finally:
        _override = outer


def policy_of(config) -> AdaptivePolicy:
    """The policy in force for a layer whose config is ``config`` (``None`` when it has none)."""
    if torch.compiler.is_compiling():
        stored = getattr(config, "ahfa", None) if config is not None else None
        return AdaptivePolicy.from_dict({**(stored or {}), **(_override or {})})
    return eager_policy_of(config)


def eager_policy_of(config) -> AdaptivePolicy:
    """``policy_of`` outside torch.compile's tracing (which cannot follow its memo of object ids). Every attention
    call asks (the attention function's memo path calls it directly): one function, no helpers.

    ``config.ahfa`` is read from the instance's ``__dict__`` where nothing else could supply it: a missing
    attribute costs ~2 us through PreTrainedConfig's ``__getattribute__`` (the exception it raises). Building the
    policy costs ~8 us on a CPU: it is reused while the stored dict (the same object, equal to the copy taken) and
    the override are unchanged, so that edits in place are seen."""
    stored = None
    if config is not None:
        try:  # past the class's own __getattribute__ (two Python-level layers on PreTrainedConfig)
            own = object.__getattribute__(config, "__dict__")
        except AttributeError:
            own = None
        cls = type(config)
        dynamic = _dynamic_classes.get(cls)
        if dynamic is None:  # a class attribute or property, an attribute map or __getattr__ may answer instead
            dynamic = _dynamic_classes[cls] = (any("ahfa" in vars(c) or "__getattr__" in vars(c) for c in cls.__mro__)
                                               or "ahfa" in (getattr(cls, "attribute_map", None) or {}))
        stored = getattr(config, "ahfa", None) if dynamic or own is None else own.get("ahfa")
    if not stored and not _override:
        return _DEFAULT
    hit = _built.get(id(stored))
    if hit is not None and hit[1] is _override and hit[0] == stored:
        return hit[2]
    policy = AdaptivePolicy.from_dict({**(stored or {}), **(_override or {})})
    if len(_built) >= 64:  # ids of configs gone; a handful are live at a time
        _built.clear()
    _built[id(stored)] = (dict(stored or {}), _override, policy)
    return policy


_dynamic_classes: dict[type, bool] = {}


def _configs_of(model) -> list:
    """The config objects of ``model`` that attention layers may hold (the model's own first)."""
    root = getattr(model, "config", model)
    found = [root]
    modules = model.modules() if hasattr(model, "modules") else []
    for module in modules:
        config = getattr(module, "config", None)
        if config is not None and not any(config is c for c in found):
            found.append(config)
    for name in ("text_config", "decoder"):
        sub = getattr(root, name, None)
        if sub is not None and hasattr(sub, "to_dict") and not any(sub is c for c in found):
            found.append(sub)
    return found
