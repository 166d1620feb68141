"""The prefix attention function: per-layer prefix keys/values joined before each layer's own.

Which implementation it wraps. A model is switched (by :mod:`dept_fast.hf.route`) from the
transformers ``AttentionInterface`` implementation it uses, the *inner* one, to the prefix attention
wrapping it, registered by :func:`register` under :func:`prefix_name` (``"dept_prefix"`` wraps
``"sdpa"``, ``"dept_prefix_eager"`` the model family's eager function, ``"dept_prefix_<inner>"``
any other: ``flex_attention``, ``flash_attention_2``/``_3``/``_4``, a kernel registered by name) with
the inner implementation's own mask function, so a model's ``config._attn_implementation`` alone
says what is wrapped and its layers receive the masks the inner implementation would, built by
transformers once per forward. What such a mask looks like is its *kind*, known from the mask
function transformers registered for the inner implementation (:func:`mask_kind`), and the prefix
joins it accordingly (:func:`join_mask`):

* ``sdpa``: (b, 1, q, k) bool, True = attend, or None for a causal batch without padding;
* ``eager``: the same as a float additive mask;
* ``flash``: a (b, k) padding mask, or None without padding; causality comes from ``is_causal``, which
  FlashAttention aligns to the bottom-right corner: a query sees the p prefix keys and its own
  earlier keys, so a batch without padding needs no mask at all;
* ``flex``: a ``BlockMask``, rebuilt over p + k keys (its mask function shifted by p, the prefix
  slots each row's own).

Implementations that cannot carry a prefix are refused, saying why: those without a mask function
(transformers then gives their layers no mask and the implementation alone decides what a query
sees, e.g. continuous batching's paged attention, which reads keys and values from its paged cache),
those with a mask function of no known kind, and FlashAttention builds that align causal masks to
the top-left corner (a query would see the prefix and lose its last p own keys).

The mask-free fast path. The prefix layout of an unpadded causal batch is causal attention aligned
to the bottom-right corner: query i sees keys j <= i + p. ``sdpa`` then gets no mask at all:
``is_causal=True`` over the queries padded at the front with p zero rows, which makes the
attention square, where sdpa's top-left alignment is the bottom-right one (the kernel's flash case
on CUDA, and on CPU; the padded rows see at most p keys and are dropped). ``torch.nn.attention.bias.
causal_lower_right`` would say the same without the padded rows, but Dynamo cannot trace it (torch
2.13), and its CUDA dispatch calls the flash kernel without grouped-query support, so grouped
heads would be repeated in every layer. A batch with padding, a mixed batch (per-row prefix slots)
and T5 (its position bias is an additive tensor, so sdpa needs a mask anyway) take a materialised
mask, joined once per forward and shared by every layer (:meth:`PrefixKV.joined_mask`). Right
padding included: causality already hides the padding from the real tokens, but without the mask
the padding rows would attend to each other and their outputs (and any loss term on them) would
differ from the model's own; and telling right from left padding means reading the mask on the
host. Where the layout allows it, FlashAttention kernels, padding of any side reaches the kernel as
its (b, k) mask, never a (b, 1, q, k) one.

One pass's instructions reach the function as the forward keyword argument :data:`PREFIX_KWARG`
(``dept_prefix``), a :class:`PrefixKV` that transformers hands down to every attention layer and
gradient checkpointing replays. Modules tagged with :data:`PREFIX_SLOT_ATTR` (their slot 0, 1, ...
among a stack's self-attention layers) get ``key_values[slot]``; an encoder-decoder's
cross-attention layers, tagged with :data:`PREFIX_CROSS_ATTR`, get theirs from ``cross`` (a
:class:`PrefixKV` of its own: its prefix joins the keys/values computed from the encoder's output,
every decoder position attends to all of it, the encoder's padding mask still covers the encoder
part); untagged ones, or a pass without prefixes for their group, run the wrapped implementation
untouched.

Why not the Cache API: PEFT hands prefixes over as a pre-filled ``past_key_values`` cache, which
transformers drops under gradient checkpointing in training, silently losing the prefix. Forward
kwargs instead reach the attention function through every layer, and checkpointing replays them;
the model's own cache (generation) then holds only real tokens.

Reentrant checkpointing (``use_reentrant=True``) does not carry gradients through tensors passed as
kwargs: if recording was on when the pass began, is off in the attention, and the prefix requires
grad (or a prompt pass is being captured), the function refuses with an error.
"""
import functools
import inspect
import re
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

KeyValue = Tuple[torch.Tensor, torch.Tensor]

PREFIX_KWARG = "dept_prefix"
PREFIX_SLOT_ATTR = "dept_prefix_slot"
PREFIX_CROSS_ATTR = "dept_prefix_cross_slot"
ATTENTION_NAMES: Dict[str, str] = {"sdpa": "dept_prefix", "eager": "dept_prefix_eager"}
"""Wrapped implementation -> the name the prefix attention wrapping it is registered under (any other
implementation joins when :func:`register` wraps it)."""
MASK_KINDS: Dict[str, str] = {"sdpa": "sdpa", "eager": "eager"}
"""Wrapped implementation -> the kind of mask its layers receive (see the module docstring)."""


class PrefixKV:
    """The ``dept_prefix`` forward kwarg: what the prefix attention does in one pass.

    A plain object, not a tuple or dict: engines that rebuild containers of tensors found in forward
    kwargs (FSDP2's per-module input casting) then hand every layer this same object, so what the
    layers write into it (``capture``, the joined masks) reaches the caller and the other layers.

    Attributes:
        key_values: per slot, the (key, value) prefixes, each (n, kv_heads, p, head_dim): n = 1 (every
            row attends to it) or one row per prefix source of a mixed batch; None: no prefix.
        source: (b,) int64, the ``key_values`` row each batch row attends to, -1 for none; None:
            every row attends to row 0.
        valid: (n, p) bool, which slots of each source are real (sources of different lengths are
            padded to p); None: all.
        capture: filled with slot -> the layer's own (key, value) of this pass (after RoPE, before a
            prefix is joined), each (batch, kv_heads, length, head_dim).
        grad_enabled: whether gradients were being recorded when the pass began (if so and recording
            is off inside the attention, a reentrant checkpoint has switched it off).
        state: what a hook that set this pass up leaves for the hook that completes it (e.g. the
            shared prompt's labels and logits), carried with the call, never on the model.
        masks: the masks joined with the prefix columns in this pass (:meth:`joined_mask`), and T5's
            position biases (:func:`join_position_bias`).
        cross: the prefixes of the cross-attention layers (an encoder-decoder's decoder pass), or None.
        positions: None: the prefix has no position (T5's position bias gives its columns none); an
            int c: the "cache" convention of PEFT's encoder-decoder prefixes, a row's prefix of p
            slots at positions 0..p-1 and its token i of this pass at p + c + i (c tokens cached
            before this pass).
    """

    __slots__ = ("key_values", "source", "valid", "capture", "grad_enabled", "state", "masks", "cross", "positions")

    def __init__(self, key_values: Optional[Sequence[KeyValue]] = None, source: Optional[torch.Tensor] = None,
                 valid: Optional[torch.Tensor] = None, capture: Optional[Dict[int, KeyValue]] = None,
                 grad_enabled: bool = False, state: Any = None) -> None:
        self.key_values = key_values
        self.source = source
        self.valid = valid
        self.capture = capture
        self.grad_enabled = grad_enabled
        self.state = state
        self.masks: List[Tuple[Any, tuple, Any]] = []
        self.cross: Optional["PrefixKV"] = None
        self.positions: Optional[int] = None

    @property
    def per_row(self) -> bool:
        """Whether rows differ in the prefix slots they attend to (a mixed batch, padded sources)."""
        return self.source is not None or self.valid is not None

    def row_valid(self, batch: int) -> Optional[torch.Tensor]:
        """(b, p) bool: the prefix slots each row attends to; None when every row attends to all of
        one shared prefix."""
        if self.source is None:
            return None if self.valid is None else self.valid[:1].expand(batch, -1)
        valid = self.valid if self.valid is not None else torch.ones(
            self.key_values[0][0].shape[0], self.key_values[0][0].shape[2], dtype=torch.bool,
            device=self.source.device)
        return valid[self.source.clamp_min(0)] & (self.source >= 0)[:, None]

    def joined_mask(self, attention_mask: Any, layout: tuple, join: Callable[[], Any], in_graph: bool = False) -> Any:
        """``join()``: ``attention_mask`` with the prefix columns, built by the first layer that
        receives this mask (transformers hands every layer of a mask type one mask object per
        forward) and reused by the others, gradient checkpointing's recomputation included;
        ``layout`` is what else the result depends on (kind, lengths, causality). ``in_graph``: reused
        even when it is in the autograd graph (what only one layer can build)."""
        if isinstance(attention_mask, torch.Tensor) and attention_mask.requires_grad and not in_graph:
            return join()  # a mask in the autograd graph is joined in each layer's own graph
        for mask, known, joined in self.masks:
            if mask is attention_mask and known == layout:
                return joined
        joined = join()
        self.masks.append((attention_mask, layout, joined))
        return joined


# ---------------------------------------------------------------------------------------------
# Which implementations are wrapped, and how

def prefix_name(inner: str) -> str:
    """The name the prefix attention wrapping ``inner`` is registered under. Characters other than
    letters, digits and "_" become "_", and "flash" "fa": transformers loads a FlashAttention kernel
    by the name of any implementation containing "flash", and a hub kernel for names with "/"."""
    if inner in ATTENTION_NAMES:
        return ATTENTION_NAMES[inner]
    return "dept_prefix_" + re.sub(r"[^0-9A-Za-z_]", "_", inner).replace("flash", "fa")


def wrapped_implementation(attn_implementation: Optional[str]) -> Optional[str]:
    """The implementation a prefix attention name wraps, or None for any other name."""
    return {name: inner for inner, name in ATTENTION_NAMES.items()}.get(attn_implementation)


def mask_kind(inner: str) -> str:
    """The kind of mask ``inner``'s layers receive ("sdpa", "eager", "flash" or "flex"; see the module
    docstring); raises ValueError naming why ``inner`` cannot carry a prefix."""
    from transformers import masking_utils
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if inner == "eager":
        return "eager"
    if wrapped_implementation(inner) is not None:
        raise ValueError(f"{inner!r} is the prefix attention itself")
    if inner not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        raise ValueError(f"{inner!r} is not an attention implementation registered with transformers' "
                         "AttentionInterface")
    mask_function = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(inner)
    if mask_function is None or "paged" in inner:
        raise ValueError(
            f"prefix attention cannot wrap attn_implementation {inner!r}: it has no mask function in transformers' "
            "AttentionMaskInterface, so its layers get no mask and the implementation alone decides what each query "
            "sees (continuous batching's paged attention reads keys and values from its paged cache); nothing can "
            "tell it about prefix keys. Load the model with attn_implementation 'sdpa', 'eager', 'flex_attention' "
            "or a flash_attention_* one")
    kinds = {masking_utils.sdpa_mask: "sdpa", masking_utils.eager_mask: "eager",
             masking_utils.flash_attention_mask: "flash", masking_utils.flex_attention_mask: "flex"}
    kind = kinds.get(mask_function)
    if kind is None:
        raise ValueError(f"prefix attention cannot wrap attn_implementation {inner!r}: its mask function "
                         f"{getattr(mask_function, '__qualname__', mask_function)!r} is none of transformers' sdpa, "
                         "eager, flash or flex masks, so what its masks mean, and how prefix columns join them, is "
                         "unknown")
    if kind == "flash":
        _check_flash(inner)
    return kind


def _check_flash(inner: str) -> None:
    """Refuse a FlashAttention implementation that cannot run here or aligns causal masks top-left."""
    from transformers import modeling_flash_attention_utils as fa

    if fa.flash_attn_supports_top_left_mask():
        raise ValueError(f"prefix attention cannot wrap attn_implementation {inner!r}: this FlashAttention build "
                         "aligns causal masks to the top-left corner (flash-attn < 2.1), so with p prefix keys before "
                         "its own each query would lose sight of its last p own keys; install flash-attn >= 2.1")
    try:  # what transformers' set_attn_implementation does for names with "flash" (ours have none)
        fa.lazy_import_flash_attention(inner)
    except Exception as error:  # ImportError, or the kernels package's errors
        raise ValueError(f"prefix attention cannot wrap attn_implementation {inner!r}: its kernel does not load "
                         f"here ({type(error).__name__}: {error})") from error


def register(inner: str = "sdpa") -> str:
    """Register the prefix attention wrapping ``inner``, with ``inner``'s mask function, with
    transformers under :func:`prefix_name` (idempotent) and return that name. Raises ValueError naming
    why when ``inner`` cannot carry a prefix (:func:`mask_kind`). Called when a model is switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    kind = mask_kind(inner)
    name = prefix_name(inner)
    taken = wrapped_implementation(name)
    if taken not in (None, inner):
        raise ValueError(f"attn_implementation {inner!r} and {taken!r} both map to the prefix attention name {name!r}")
    mask_function = ALL_MASK_ATTENTION_FUNCTIONS["eager" if inner == "eager" else inner]
    if kind == "sdpa" and inner != "sdpa":
        mask_function = _materialised(mask_function)  # what None means to another kernel is unknown
    AttentionInterface.register(name, functools.partial(prefix_attention_forward, inner=inner, kind=kind))
    AttentionMaskInterface.register(name, mask_function)
    ATTENTION_NAMES[inner] = name
    MASK_KINDS[inner] = kind
    return name


def _materialised(sdpa_mask: Callable) -> Callable:
    """transformers' sdpa mask without its skips (never None): for kernels other than sdpa itself."""
    no_skip = {name: False for name in ("allow_is_causal_skip", "allow_is_bidirectional_skip")
               if name in inspect.signature(sdpa_mask).parameters}

    def mask(*args, **kwargs) -> Optional[torch.Tensor]:
        return sdpa_mask(*args, **{**kwargs, **no_skip})
    return mask


# ---------------------------------------------------------------------------------------------
# The wrapped implementations

def _eager_attention(module: nn.Module) -> Callable:
    """The model family's own eager attention (transformers defines one per modeling module)."""
    function = getattr(inspect.getmodule(type(module)), "eager_attention_forward", None)
    if function is None:
        raise TypeError(f"{type(module).__name__}'s module defines no eager_attention_forward; "
                        "build the model with attn_implementation='sdpa' to use prefix attention")
    return function


class _ConfigAs:
    """A config read through, except that ``_attn_implementation`` names the wrapped implementation."""

    def __init__(self, config: Any, inner: str) -> None:
        self._config, self._attn_implementation = config, inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


class _ModuleAs:
    """An attention module as the wrapped implementation expects to see it: every attribute read
    through to ``module`` (live: ``training``, parameters), its ``config`` naming the wrapped
    implementation (``flash_attention_forward`` loads its kernel by that name)."""

    def __init__(self, module: nn.Module, inner: str) -> None:
        self._module, self.config = module, _ConfigAs(module.config, inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def call_inner(inner: str, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: Any, **kwargs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run the wrapped implementation; eager gets a boolean mask as an additive one."""
    if inner == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if inner == "eager":
        return _eager_attention(module)(module, query, key, value, _additive(attention_mask, query.dtype), **kwargs)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seen_as = _ModuleAs(module, inner) if hasattr(module, "config") else module
    return ALL_ATTENTION_FUNCTIONS[inner](seen_as, query, key, value, attention_mask, **kwargs)


def _additive(attention_mask: Any, dtype: torch.dtype) -> Any:
    """A boolean mask as an additive one (0 = attend, the dtype's minimum = not); others as they are."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, torch.zeros((), dtype=dtype, device=attention_mask.device),
                           torch.finfo(dtype).min)
    return attention_mask


# ---------------------------------------------------------------------------------------------
# Masks over [prefix ; own keys]

def join_mask(kind: str, attention_mask: Any, prefix_valid: Optional[torch.Tensor], n_prefix: int, batch: int,
              q_len: int, kv_len: int, causal: bool, device: torch.device, dtype: torch.dtype) -> Any:
    """``attention_mask`` (of ``kind``, over the ``kv_len`` own keys) with ``n_prefix`` leading prefix
    columns: attend to all of them, or per row to ``prefix_valid`` (b, p). None where none is needed."""
    if kind == "flash":
        return _flash_mask(attention_mask, prefix_valid, n_prefix, batch, kv_len, device)
    if kind == "flex" and not isinstance(attention_mask, torch.Tensor):
        return _flex_mask(attention_mask, prefix_valid, n_prefix, batch, q_len, kv_len, device)
    mask = _dense_mask(attention_mask, prefix_valid, n_prefix, batch, q_len, kv_len, causal, device)
    return _additive(mask, dtype) if kind in ("eager", "flex") else mask


def _dense_mask(attention_mask: Optional[torch.Tensor], prefix_valid: Optional[torch.Tensor], n_prefix: int,
                batch: int, q_len: int, kv_len: int, causal: bool, device: torch.device) -> Optional[torch.Tensor]:
    """A (b or 1, 1, q, p + k) mask, bool or additive as ``attention_mask``. A missing mask means
    "attend to all" unless the module is causal, where it becomes the causal mask (query i sees own
    keys j <= i + kv_len - q_len, the alignment a cache gives)."""
    if attention_mask is None:
        if prefix_valid is None and (not causal or q_len == 1):
            return None
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
        if causal:
            attention_mask = attention_mask.tril(kv_len - q_len)
    boolean = attention_mask.dtype == torch.bool
    if prefix_valid is None:
        return F.pad(attention_mask, (n_prefix, 0), value=True if boolean else 0.0)
    columns = prefix_valid[:, None, None, :].expand(batch, 1, q_len, n_prefix)
    if not boolean:
        columns = torch.zeros((), dtype=attention_mask.dtype, device=device).masked_fill(
            ~columns, torch.finfo(attention_mask.dtype).min)
    own = attention_mask.expand(batch, 1, q_len, kv_len)
    return torch.cat([columns.to(own.dtype), own], dim=-1)


def _flash_mask(attention_mask: Optional[torch.Tensor], prefix_valid: Optional[torch.Tensor], n_prefix: int,
                batch: int, kv_len: int, device: torch.device) -> Optional[torch.Tensor]:
    """FlashAttention's (b, p + k) padding mask: the prefix slots each row attends to, then the own
    keys' padding; None (no padding anywhere) stays None. FlashAttention unpads the keys by it and
    the queries by its last q columns, and aligns causality bottom-right among a row's real keys."""
    if attention_mask is None and prefix_valid is None:
        return None
    own = (torch.ones(batch, kv_len, dtype=torch.bool, device=device) if attention_mask is None
           else attention_mask[:, -kv_len:].bool())
    columns = (torch.ones(batch, n_prefix, dtype=torch.bool, device=device) if prefix_valid is None
               else prefix_valid)
    return torch.cat([columns, own.expand(batch, kv_len)], dim=-1)


def _flex_mask(block_mask: Any, prefix_valid: Optional[torch.Tensor], n_prefix: int, batch: int, q_len: int,
               kv_len: int, device: torch.device) -> Any:
    """flex attention's ``BlockMask`` over [prefix ; own keys]: key slot j < p is prefix slot j (every
    query sees it, or per row ``prefix_valid``), j >= p is own key j - p as ``block_mask`` says
    (None: every own key)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if block_mask is None and prefix_valid is None:
        return None
    own_mod = None if block_mask is None else block_mask.mask_mod

    def mask_mod(b, h, q_idx, kv_idx):
        own_key = (kv_idx - n_prefix).clamp_min(0)
        own = own_key >= 0 if own_mod is None else own_mod(b, h, q_idx, own_key)
        prefix = kv_idx >= 0 if prefix_valid is None else prefix_valid[b, kv_idx.clamp_max(n_prefix - 1)]
        return torch.where(kv_idx < n_prefix, prefix, own)

    return create_block_mask(mask_mod, B=batch, H=None, Q_LEN=q_len, KV_LEN=n_prefix + kv_len, device=device)


# ---------------------------------------------------------------------------------------------
# The attention

def attend_with_prefix(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Any, prefix: PrefixKV, slot: int, inner: str, kind: Optional[str] = None,
                       **kwargs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention of ``query`` (b, heads, q, head_dim) over ``[prefix ; own keys]``.

    This is the one slot for a Triton prefix-attention kernel. Today it takes layer ``slot``'s
    prefix (n, kv_heads, p, head_dim), expanded to the batch when every row shares it (a view) or
    gathered per row by ``prefix.source`` in a mixed batch (a (b, kv_heads, p, head_dim) copy: the
    concatenation below copies it once more, so a mixed batch materialises the prefix rows twice,
    never per-row copies of anything else), concatenates it before the layer's keys/values, joins
    the mask (:func:`join_mask`, once per forward; T5's position bias gets p zero columns: the
    prefix has no position) and calls the wrapped implementation, with ``is_causal`` off except for
    FlashAttention, whose causal alignment is the prefix layout's. An unpadded causal batch on sdpa
    takes the mask-free form (see the module docstring). A fused kernel would attend to the
    unexpanded prefixes and merge that with each row's own attention by log-sum-exp, never
    materialising the concatenation; it must keep this signature and return (output (b, q, heads,
    head_dim), attention weights or None), exactly as the code below. See
    :func:`dept_fast.ops.prefix_attention_reference` for the math.
    """
    kind = kind or MASK_KINDS[inner]
    batch, q_len, kv_len = key.shape[0], query.shape[2], key.shape[2]
    prefix_key, prefix_value = prefix.key_values[slot]
    n_prefix = prefix_key.shape[2]
    causal = kwargs.pop("is_causal", None)
    causal = getattr(module, "is_causal", False) if causal is None else causal
    position_bias = kwargs.get("position_bias")
    if prefix.source is None:
        prefix_key, prefix_value = (t.expand(batch, -1, -1, -1) for t in (prefix_key, prefix_value))
    else:
        rows = prefix.source.clamp_min(0)
        prefix_key, prefix_value = prefix_key[rows], prefix_value[rows]
    key = torch.cat([prefix_key.to(key.dtype), key], dim=2)
    value = torch.cat([prefix_value.to(value.dtype), value], dim=2)
    if mask_free(inner, attention_mask, causal, q_len, prefix, position_bias):
        return _square_causal(module, query, key, value, **kwargs)
    attention_mask = prefix.joined_mask(attention_mask, (kind, q_len, kv_len, causal), lambda: join_mask(
        kind, attention_mask, prefix.row_valid(batch), n_prefix, batch, q_len, kv_len, causal, query.device,
        query.dtype))
    if position_bias is not None:
        kwargs["position_bias"] = join_position_bias(module, prefix, position_bias, q_len, n_prefix)
    return call_inner(inner, module, query, key, value, attention_mask, is_causal=causal and kind == "flash",
                      **kwargs)


def join_position_bias(module: nn.Module, prefix: PrefixKV, position_bias: torch.Tensor, q_len: int,
                       n_prefix: int) -> torch.Tensor:
    """T5's additive position bias (1 or b, heads, q, k) with ``n_prefix`` prefix columns before it.

    Without positions (``prefix.positions`` None) the columns are zeros. Under the "cache" convention
    they are the bias of keys at 0..p-1 for queries at p + c + i, what a pre-filled cache of p slots
    gives (T5's bias depends on key - query only, so the own keys' columns, at p + j against
    p + c + i, are the model's own). They are computed once per forward by the layer that owns the
    bias table, with its own ``compute_bias`` (T5's first layer, which transformers runs first and
    whose bias every later layer receives), and reused by the others (:meth:`PrefixKV.joined_mask`)."""
    if prefix.positions is None:
        return F.pad(position_bias, (n_prefix, 0))

    def join() -> torch.Tensor:
        columns = _cache_bias_columns(module, prefix, q_len, n_prefix).to(position_bias.dtype)
        own = position_bias.expand(columns.shape[0], -1, -1, -1)
        return torch.cat([columns, own], dim=-1)

    return prefix.joined_mask(position_bias, ("position_bias", q_len, n_prefix, prefix.positions), join, in_graph=True)


def _cache_bias_columns(module: nn.Module, prefix: PrefixKV, q_len: int, n_prefix: int) -> torch.Tensor:
    """(1 or b, heads, q, P): per row, the bias of prefix keys at 0..P-1 for queries at p + c + i
    (p the row's prefix length; slots past it are masked)."""
    if getattr(module, "relative_attention_bias", None) is None or not callable(getattr(module, "compute_bias", None)):
        raise TypeError(f"{type(module).__name__} received a position bias it does not own before the layer that owns "
                        "it (relative_attention_bias, compute_bias) ran in this pass, so the bias of the prefix columns "
                        "under the 'cache' position convention is unknown")
    sources = prefix.key_values[0][0].shape[0]
    lengths = [n_prefix] * sources if prefix.valid is None else prefix.valid.sum(-1).tolist()
    device = prefix.key_values[0][0].device
    columns = torch.cat([module.compute_bias(q_len, n_prefix, device=device, past_seen_tokens=length + prefix.positions)
                         for length in lengths])
    return columns if prefix.source is None else columns[prefix.source.clamp_min(0)]


def mask_free(inner: str, attention_mask: Any, causal: bool, q_len: int, prefix: PrefixKV,
              position_bias: Optional[torch.Tensor]) -> bool:
    """Whether a layer takes the mask-free form: sdpa, a causal layer with more than one query and no
    mask (transformers' sdpa mask function returns None for a batch without padding), every row
    attending to all of one prefix, no additive position bias."""
    return (inner == "sdpa" and attention_mask is None and causal and q_len > 1 and not prefix.per_row
            and position_bias is None)


def _square_causal(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   **kwargs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """sdpa with ``is_causal=True`` and no mask over keys (b, kv_heads, k, d) of which the queries
    (b, heads, q, d) are the last q: the queries padded at the front to k rows of zeros make the
    attention square, so query i sees keys j <= i + k - q; the padded rows are dropped."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pad = key.shape[2] - query.shape[2]
    padded = torch.cat([query.new_zeros(query.shape[0], query.shape[1], pad, query.shape[3]), query], dim=2)
    output, weights = sdpa_attention_forward(module, padded, key, value, None, is_causal=True, **kwargs)
    return output[:, pad:], weights


Call = Tuple[nn.Module, torch.Tensor, bool]
_probe_calls: ContextVar[Optional[List[Call]]] = ContextVar("dept_fast_probe_calls", default=None)


@contextmanager
def recording_calls() -> Iterator[List[Call]]:
    """Within the context (this thread / task only), every call of the prefix attention appends
    (module, key, whether it received the kwarg) and returns zeros of the attention's output shape
    without running the wrapped kernel (so probing a flex model compiles nothing): how
    :mod:`dept_fast.hf.route` probes a model. Never active under torch.compile."""
    calls: List[Call] = []
    token = _probe_calls.set(calls)
    try:
        yield calls
    finally:
        _probe_calls.reset(token)


REENTRANT_ERROR = (
    "prefix attention: gradient recording was switched off between the model's forward and its attention "
    "while the prefix requires grad (or the keys/values captured for a shared prompt do). "
    "This is reentrant activation checkpointing (use_reentrant=True), which does not carry gradients "
    "through keyword arguments: the prefix gradient would be wrong. Use non-reentrant checkpointing, "
    "e.g. model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}).")


def prefix_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Any, dept_prefix: Optional[PrefixKV] = None, *, inner: str = "sdpa",
                             kind: Optional[str] = None, **kwargs) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The registered attention function (wrapping ``inner``, whose masks are of ``kind``); see the
    module docstring."""
    spec = dept_prefix if dept_prefix is not None else PrefixKV()
    # Dynamo cannot trace ContextVar.get; a probe runs at attach, never compiled.
    calls = None if torch.compiler.is_compiling() else _probe_calls.get()
    if calls is not None:
        calls.append((module, key, dept_prefix is not None))
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[3]), None
    slot = getattr(module, PREFIX_SLOT_ATTR, None)
    cross = getattr(module, PREFIX_CROSS_ATTR, None)
    if cross is not None:  # an encoder-decoder's cross-attention layer: the prefixes of its group
        spec, slot = spec.cross or PrefixKV(), cross
    lost_grad = spec.grad_enabled and not torch.is_grad_enabled()
    if slot is not None and spec.capture is not None:
        if lost_grad:  # the captured K/V would carry no gradient
            raise RuntimeError(REENTRANT_ERROR)
        spec.capture[slot] = (key, value)
    if slot is not None and spec.key_values is not None:
        if lost_grad and any(t.requires_grad for t in spec.key_values[slot]):
            raise RuntimeError(REENTRANT_ERROR)
        return attend_with_prefix(module, query, key, value, attention_mask, spec, slot, inner, kind, **kwargs)
    return call_inner(inner, module, query, key, value, attention_mask, **kwargs)
