"""DePT on a HuggingFace transformers model: ``apply_dept`` and ``load_dept``.

The adapter is a :class:`FusedDePTEmbedding` registered on the model as ``model.dept``; the base
model is frozen and keeps its class, its forward signature and ``generate()``. Forward pre-hooks
turn the caller's token ids into ``inputs_embeds`` before the model runs:

* decoder-only (GPT-2, Llama, ...), a hook on the model, one of two routes:

  - shared prompt (``share_prompt``, the default where it is exact; :mod:`dept_fast.hf.shared_prompt`):
    the prompt runs once per call (batch 1) and its per-layer K/V join every row's attention as
    a prefix; the model sees ``E[ids] + scaling * (A @ B)[pos]`` at positions ``m + pos``, its
    cache holds only real tokens, and logits cover the L input positions;
  - prompt in every row: ``[P ; E[ids] + scaling * (A @ B)[pos]]`` on the first pass over a
    sequence (no cache yet), ``E[ids] + scaling * (A @ B)[pos]`` on later generation steps (the
    prompt is already in the cache); m ones are prepended to ``attention_mask``, m x -100 to
    ``labels``, and the model's ``position_ids`` become ``[0..m-1 ; m + pos]``. The returned logits
    cover the m prompt positions too (as in PEFT).
* encoder-decoder (T5): the encoder input gets the prompt and update (labels are untouched);
  a hook on the model converts ``input_ids`` for its encoder call and extends the mask that the
  decoder's cross-attention sees, a hook on the encoder does the same when ``generate()`` calls
  the encoder directly.

Positions (:mod:`dept_fast.hf.positions`): ``pos`` is a token's row of A and, after the prompt, its
model position. Right-padded and unpadded batches have ``pos`` = column, the DePT authors' formula
``E[ids] + scaling * (A @ B)[:L]``, and run the fused kernel; other batches (left padding,
generation steps) take the adapter's per-position path. Passing ``position_ids=torch.arange(L)``
selects column positions for any padding (what PEFT and the DePT authors' decoder-only code do with
left-padded inputs).
"""
import dataclasses
import inspect
import os
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from ..checkpoint.dept import adapter_config, build_embedding, read_checkpoint
from ..modules.dept_embedding import FusedDePTEmbedding
from .attach import attach, forward_arguments
from .positions import cached_length, generation_cache, positions_are_columns, token_positions
from .route import prefix_route, route_of
from .shared_prompt import SharedPrompt

ADAPTER_NAME = "dept"
SHARED_PROMPT_USER = "shared_prompt"
PREFIX_TUNING_USER = "prefix_tuning"


def apply_dept(model: nn.Module, num_prompt_tokens: int, rank: int, max_length: int,
               lora_alpha: float = 8.0, share_prompt: Optional[bool] = None) -> nn.Module:
    """Freeze ``model`` and attach a fresh DePT adapter (``model.dept``) to its input embeddings.

    Args:
        model: a transformers model with ``get_input_embeddings()`` returning an ``nn.Embedding``:
            encoder-decoder (``config.is_encoder_decoder``, e.g. T5) or decoder-only (GPT-2, Llama).
        num_prompt_tokens: m, soft prompt length.
        rank: r of the position-wise low-rank update; 0 is vanilla prompt tuning.
        max_length: s, positions covered by the update: every real input token must sit at a
            position < s (shorter inputs are fine; nothing is padded to s). m + s must fit the
            model's position limit (``max_position_embeddings``), if it has one.
        lora_alpha: scaling = lora_alpha / sqrt(r), as in the DePT authors' code.
        share_prompt: run the prompt once per call and share its keys/values with every row
            (:mod:`dept_fast.hf.shared_prompt`; exact in causal decoders). None: on for causal
            decoders whose attention goes through transformers' ``AttentionInterface`` (GPT-2,
            Llama, ...; the model is switched to the ``"dept_prefix"`` attention), off otherwise
            (encoder-decoders such as T5, whose encoder is bidirectional). True: on, or a
            ValueError/TypeError saying why it cannot be exact on this model. False: the prompt in
            every row. ``model.dept.share_prompt`` tells which route was taken. With sharing, the
            logits cover the L input positions only (not m + L).

    Returns:
        The same model object, called exactly as before (``input_ids``, ``attention_mask``,
        ``labels``, ``generate``); only ``model.dept``'s parameters require grad.
    """
    word_embeddings = _word_embeddings(model)
    _check_position_limit(model, num_prompt_tokens, max_length)
    adapter = FusedDePTEmbedding(word_embeddings, num_prompt_tokens, rank, max_length, lora_alpha)
    return _attach(model, adapter, share_prompt)


def load_dept(model: nn.Module, path: Union[str, os.PathLike], share_prompt: Optional[bool] = None, *,
              max_length: Optional[int] = None) -> nn.Module:
    """Freeze ``model`` and attach the DePT adapter saved in directory ``path``.

    Reads our format (``FusedDePTEmbedding.save_pretrained``), the DePT authors'
    ``PROMPT_TUNING_LORA`` checkpoints, PEFT ``PROMPT_TUNING`` checkpoints and whole-model saves of a
    DePT model (``model.save_pretrained``, the HF Trainer's ``save_model`` and checkpoints; see
    :mod:`dept_fast.checkpoint.dept`). ``max_length`` is used only for checkpoints that do not record
    one (PEFT prompt tuning); a decoder-only model defaults it to its position limit minus the
    prompt, an encoder-decoder model with relative positions (T5) has no limit and needs it passed.
    ``share_prompt`` as in :func:`apply_dept`.
    """
    word_embeddings = _word_embeddings(model)
    checkpoint = read_checkpoint(path, word_embeddings.embedding_dim, max_length)
    config = checkpoint.config
    limit = _position_limit(model)
    if config.max_length is None and limit is not None and not model.config.is_encoder_decoder:
        checkpoint.config = config = dataclasses.replace(config, max_length=limit - config.num_prompt_tokens)
    _check_position_limit(model, config.num_prompt_tokens, config.max_length)
    return _attach(model, build_embedding(checkpoint, word_embeddings), share_prompt)


def _word_embeddings(model: nn.Module) -> nn.Embedding:
    if not hasattr(model, "get_input_embeddings") or not hasattr(model, "config"):
        raise TypeError(f"expected a transformers model (with .config and .get_input_embeddings()), "
                        f"got {type(model).__name__}")
    embeddings = model.get_input_embeddings()
    if not isinstance(embeddings, nn.Embedding):
        raise TypeError(f"{type(model).__name__}.get_input_embeddings() is a {type(embeddings).__name__}, "
                        "not an nn.Embedding; DePT needs a plain embedding table")
    return embeddings


def _position_limit(model: nn.Module) -> Optional[int]:
    """The positions the model can hold (``max_position_embeddings`` / ``n_positions``), or None (T5)."""
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _check_position_limit(model: nn.Module, num_prompt_tokens: int, max_length: Optional[int]) -> None:
    limit = _position_limit(model)
    if limit is not None and max_length is not None and num_prompt_tokens + max_length > limit:
        raise ValueError(f"{type(model).__name__} holds {limit} positions, but num_prompt_tokens + max_length = "
                         f"{num_prompt_tokens} + {max_length} = {num_prompt_tokens + max_length}; lower max_length "
                         f"to at most {limit - num_prompt_tokens}")


def _attach(model: nn.Module, adapter: FusedDePTEmbedding, share_prompt: Optional[bool]) -> nn.Module:
    if isinstance(getattr(model, ADAPTER_NAME, None), FusedDePTEmbedding):
        raise ValueError(f"{type(model).__name__} already has a DePT adapter (model.{ADAPTER_NAME}); "
                         "apply_dept/load_dept take a model without one")
    if share_prompt not in (None, True, False):
        raise TypeError(f"share_prompt must be None, True or False, got {share_prompt!r}")
    # Rank 0 leaves A (s x 0) and B (0 x d) empty: frozen, so DDP and optimizers never wait on them.
    for p in (adapter.lora_A, adapter.lora_B):
        p.requires_grad_(adapter.rank > 0)
    # E is the model's own tensor, saved under the model's name: keep it out of the adapter's state
    # (model.save_pretrained refuses untied shared tensors), and let load_state_dict reuse the model's.
    adapter.register_state_dict_post_hook(_drop_word_embeddings)
    adapter.register_load_state_dict_pre_hook(_reuse_word_embeddings)
    config = adapter_config(adapter).to_json()
    if model.config.is_encoder_decoder:
        if share_prompt:
            raise ValueError(f"share_prompt=True: {type(model).__name__} is an encoder-decoder model; its encoder "
                             "attends both ways, so the prompt's keys/values depend on each row's input and cannot "
                             "be shared")
        adapter.share_prompt = False
        encoder = model.get_encoder()
        hooks = [(model, "pre", Seq2SeqInputs(adapter, model.forward)),
                 (encoder, "pre", EncoderInputs(adapter, encoder.forward))]
        return attach(model, ADAPTER_NAME, adapter, config, hooks)
    shared = _shared_prompt(model, adapter, share_prompt)
    adapter.share_prompt = shared is not None
    hooks = [(model, "pre", DecoderInputs(adapter, model.forward, shared))]
    if shared is not None:
        hooks.append((model, "post", shared.add_prompt_loss))
    return attach(model, ADAPTER_NAME, adapter, config, hooks)


def _shared_prompt(model: nn.Module, adapter: FusedDePTEmbedding, share_prompt: Optional[bool]) -> Optional[SharedPrompt]:
    """The shared-prompt route for a decoder (see :func:`apply_dept`), or None for the prompt in every row."""
    if share_prompt is False or adapter.num_prompt_tokens == 0:  # no prompt: nothing to share
        return None
    route = route_of(model)
    if route is not None and PREFIX_TUNING_USER in route.users:
        if share_prompt:
            raise ValueError(f"share_prompt=True: {type(model).__name__} has Prefix-Tuning prefixes, which take "
                             "the same attention argument as a shared prompt; use share_prompt=False")
        return None
    try:
        with prefix_route(model, SHARED_PROMPT_USER) as route:
            return SharedPrompt(adapter, model, route)
    except (TypeError, ValueError) as error:
        if share_prompt:
            raise type(error)(f"share_prompt=True cannot be exact on this model: {error}") from error
        return None


def _drop_word_embeddings(module: FusedDePTEmbedding, state_dict: Dict[str, Any], prefix: str, *_) -> None:
    state_dict.pop(prefix + "word_embeddings.weight", None)


def _reuse_word_embeddings(module: FusedDePTEmbedding, state_dict: Dict[str, Any], prefix: str, *_) -> None:
    state_dict.setdefault(prefix + "word_embeddings.weight", module.word_embeddings.weight.detach())


# ---------------------------------------------------------------------------------------------
# Building the inputs


def embed_tokens(adapter: FusedDePTEmbedding, input_ids: torch.Tensor, positions: torch.Tensor,
                 attention_mask: Optional[torch.Tensor], with_prompt: bool) -> torch.Tensor:
    """``[P ;] E[ids] + scaling * (A @ B)[positions]`` through the adapter: the fused stage when every
    real token sits at its column, the per-position path otherwise."""
    columns = positions_are_columns(positions, attention_mask)
    return adapter(input_ids, with_prompt=with_prompt, positions=None if columns else positions)


def _prepend(tensor: torch.Tensor, count: int, value: int) -> torch.Tensor:
    head = torch.full((tensor.shape[0], count), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([head, tensor], dim=1)


class _Inputs:
    """A forward pre-hook (``with_kwargs=True``) that rewrites a model's inputs for the adapter.

    A callable object rather than a closure, so ``copy.deepcopy(model)`` maps it onto the copy's
    adapter. It holds configuration only: everything of one call stays in that call.
    """

    def __init__(self, adapter: FusedDePTEmbedding, forward) -> None:
        self.adapter = adapter
        self.signature = inspect.signature(forward)
        self.takes_position_ids = "position_ids" in self.signature.parameters

    def arguments(self, args: tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """The call's arguments by name, after refusing what a DePT model cannot take."""
        kwargs = forward_arguments(self.signature, args, kwargs)
        if kwargs.get("token_type_ids") is not None:
            raise ValueError("token_type_ids are not supported by a DePT model")
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if ids is not None and (not isinstance(ids, torch.Tensor) or ids.dim() != 2):
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"a DePT model takes 2-D input_ids (batch, length), got {shape}; "
                             "for a single sequence pass input_ids.unsqueeze(0)")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"a DePT model takes a 2-D attention_mask (batch, length), got {shape}; 4-D masks "
                             "and per-layer mask dicts (from static or compiled caches) are not supported")
        cache = generation_cache(kwargs)
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError(f"a DePT model needs a dynamic generation cache (generate()'s default); got a "
                             f"{type(cache).__name__}, whose fixed-size layers (static / compiled caches) cannot "
                             "hold the prompt's positions")
        return kwargs

    def require_ids(self, kwargs: Dict[str, Any]) -> torch.Tensor:
        """The call's input_ids; inputs_embeds are refused (the adapter builds them)."""
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("a DePT model builds inputs_embeds itself from input_ids (prompt + low-rank update); "
                             "pass input_ids instead of inputs_embeds")
        ids = kwargs.get("input_ids")
        if ids is None:
            raise ValueError("a DePT model needs input_ids")
        return ids


def encoder_inputs(adapter: FusedDePTEmbedding, kwargs: Dict[str, Any], input_ids: torch.Tensor) -> Dict[str, Any]:
    """Encoder inputs ``[P ; E[ids] + update]`` with m ones prepended to the attention mask."""
    mask = kwargs.get("attention_mask")
    positions = token_positions(*input_ids.shape, input_ids.device, mask, None, 0)
    kwargs["inputs_embeds"] = embed_tokens(adapter, input_ids, positions, mask, with_prompt=True)
    kwargs["input_ids"] = None
    if mask is not None:
        kwargs["attention_mask"] = _prepend(mask, adapter.num_prompt_tokens, 1)
    return kwargs


class DecoderInputs(_Inputs):
    """Decoder-only models: ``__call__`` validates the call and works out each token's position;
    the prompt then reaches the model by one of two routes, ``prompt_shared`` (``shared`` given:
    one prompt pass whose K/V every row attends to; the cache holds real tokens only) or
    ``prompt_in_sequence`` (prompt + update on the first pass, update only on cached steps).
    """

    def __init__(self, adapter: FusedDePTEmbedding, forward, shared: Optional[SharedPrompt]) -> None:
        super().__init__(adapter, forward)
        self.shared = shared

    def __call__(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]):
        kwargs = self.arguments(args, kwargs)
        input_ids = self.require_ids(kwargs)
        m = self.adapter.num_prompt_tokens
        past = cached_length(kwargs)
        cached_prompt = 0 if self.shared is not None else m  # prompt tokens a cache of this model holds
        if 0 < past < cached_prompt:
            raise ValueError(f"the cache holds {past} tokens, fewer than the {m} prompt tokens: it was not "
                             "built by this DePT model")
        seen = max(past - cached_prompt, 0)  # the caller's tokens already in the cache
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape[1] != seen + input_ids.shape[1]:
            raise ValueError(f"attention_mask has {mask.shape[1]} columns, expected {seen + input_ids.shape[1]} "
                             f"({seen} cached + {input_ids.shape[1]} new tokens; the prompt is added by the model)")
        positions = token_positions(*input_ids.shape, input_ids.device, mask, kwargs.get("position_ids"), seen)
        if self.shared is not None:
            return (), self.prompt_shared(module, kwargs, input_ids, positions)
        return (), self.prompt_in_sequence(kwargs, input_ids, positions, first_pass=past == 0)

    def prompt_shared(self, module: nn.Module, kwargs: Dict[str, Any], input_ids: torch.Tensor,
                      positions: torch.Tensor) -> Dict[str, Any]:
        """The rows carry their tokens alone, ``inputs_embeds`` (b, L, d) at positions m + pos; the
        prompt's K/V come from :class:`SharedPrompt` (model positions are shifted there)."""
        kwargs["inputs_embeds"] = embed_tokens(self.adapter, input_ids, positions, kwargs.get("attention_mask"),
                                               with_prompt=False)
        kwargs["input_ids"] = None
        if self.takes_position_ids:
            kwargs["position_ids"] = positions
        return self.shared.input_kwargs(module, kwargs, shift_positions=self.takes_position_ids)

    def prompt_in_sequence(self, kwargs: Dict[str, Any], input_ids: torch.Tensor, positions: torch.Tensor,
                           first_pass: bool) -> Dict[str, Any]:
        """Every row carries the prompt: ``inputs_embeds`` (b, m + L, d) on the first pass."""
        m = self.adapter.num_prompt_tokens
        mask = kwargs.get("attention_mask")
        kwargs["inputs_embeds"] = embed_tokens(self.adapter, input_ids, positions, mask, with_prompt=first_pass)
        kwargs["input_ids"] = None
        if mask is not None:
            kwargs["attention_mask"] = _prepend(mask, m, 1)
        if first_pass and kwargs.get("labels") is not None:
            kwargs["labels"] = _prepend(kwargs["labels"], m, -100)
        if self.takes_position_ids and (mask is not None or kwargs.get("position_ids") is not None):
            model_positions = positions + m
            if first_pass:
                prompt_positions = torch.arange(m, device=positions.device).expand(positions.shape[0], m)
                model_positions = torch.cat([prompt_positions, model_positions], dim=1)
            kwargs["position_ids"] = model_positions
        return kwargs


class Seq2SeqInputs(_Inputs):
    """Encoder-decoder models: DePT inputs for the encoder, the prompt's mask columns for the decoder."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]):
        kwargs = self.arguments(args, kwargs)
        if kwargs.get("encoder_outputs") is None:
            return (), encoder_inputs(self.adapter, kwargs, self.require_ids(kwargs))
        mask = kwargs.get("attention_mask")
        if mask is not None:  # generate() ran the encoder already (through EncoderInputs)
            encoded = kwargs["encoder_outputs"][0].shape[1]
            m = self.adapter.num_prompt_tokens
            if encoded != mask.shape[1] + m:
                raise ValueError(f"encoder_outputs have {encoded} positions but attention_mask has {mask.shape[1]} "
                                 f"columns; with the {m} prompt tokens expected {mask.shape[1] + m}")
            kwargs["attention_mask"] = _prepend(mask, m, 1)
        return (), kwargs


class EncoderInputs(_Inputs):
    """The encoder called on token ids directly (as ``generate()`` does): DePT inputs."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]):
        kwargs = self.arguments(args, kwargs)
        if kwargs.get("input_ids") is None:  # embeddings built by Seq2SeqInputs, or the caller's own
            return (), kwargs
        return (), encoder_inputs(self.adapter, kwargs, self.require_ids(kwargs))
