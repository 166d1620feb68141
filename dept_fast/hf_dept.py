"""DePT on a HuggingFace transformers model: ``apply_dept`` and ``load_dept``.

The adapter is a :class:`FusedDePTEmbedding` registered on the model as ``model.dept``; the base
model is frozen and keeps its class, its forward signature and ``generate()``. Forward pre-hooks
turn the caller's token ids into ``inputs_embeds`` before the model runs:

* decoder-only (GPT-2, Llama, ...), a hook on the model, one of two routes:

  - shared prompt (``share_prompt``, the default where it is exact; :mod:`dept_fast.shared_prompt`):
    the prompt runs once per batch (batch 1) and its per-layer K/V join every row's attention as
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

Positions. ``pos`` (the row of A a token takes, and its model position after the prompt) is
the caller's ``position_ids`` when given, else the token's index among its row's real tokens,
``cumsum(attention_mask) - 1``, as HF's ``generate()`` computes it. So a left-padded row gives the
same numbers as the row run alone, and generation step k of a row with n real tokens uses A row
n + k. Right-padded and unpadded batches have ``pos`` = column, the DePT authors' formula
``E[ids] + scaling * (A @ B)[:L]``, and run the fused kernel; other batches (left padding,
generation steps) take the PyTorch path :func:`dept_embedding_at_positions_reference`. Passing
``position_ids=torch.arange(L)`` selects column positions for any padding (what PEFT and the DePT
authors' decoder-only code do with left-padded inputs).
"""
import inspect
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .checkpoint import build_embedding, read_checkpoint
from .embedding import FusedDePTEmbedding
from .prefix_attention import cached_length, prefix_attention_setup
from .reference import dept_embedding_at_positions_reference
from .shared_prompt import SharedPrompt

ADAPTER_NAME = "dept"
PREFIX_TUNING_NAME = "prefix_tuning"  # dept_fast.prefix_tuning.ADAPTER_NAME (that module imports this one)


def apply_dept(model: nn.Module, num_prompt_tokens: int, rank: int, max_length: int,
               lora_alpha: float = 8.0, share_prompt: Optional[bool] = None) -> nn.Module:
    """Freeze ``model`` and attach a fresh DePT adapter (``model.dept``) to its input embeddings.

    Args:
        model: a transformers model with ``get_input_embeddings()`` returning an ``nn.Embedding``:
            encoder-decoder (``config.is_encoder_decoder``, e.g. T5) or decoder-only (GPT-2, Llama).
        num_prompt_tokens: m, soft prompt length.
        rank: r of the position-wise low-rank update; 0 is vanilla prompt tuning.
        max_length: s, positions covered by the update: every real input token must sit at a
            position < s (shorter inputs are fine; nothing is padded to s).
        lora_alpha: scaling = lora_alpha / sqrt(r), as in the DePT authors' code.
        share_prompt: run the prompt once per batch and share its keys/values with every row
            (:mod:`dept_fast.shared_prompt`; exact in causal decoders). None: on for causal
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
    adapter = FusedDePTEmbedding(_word_embeddings(model), num_prompt_tokens, rank, max_length, lora_alpha)
    return _attach(model, adapter, share_prompt)


def load_dept(model: nn.Module, path: Union[str, os.PathLike], share_prompt: Optional[bool] = None, *,
              max_length: Optional[int] = None) -> nn.Module:
    """Freeze ``model`` and attach the DePT adapter saved in directory ``path``.

    Reads our format (``FusedDePTEmbedding.save_pretrained``), the DePT authors'
    ``PROMPT_TUNING_LORA`` checkpoints and PEFT ``PROMPT_TUNING`` checkpoints (see
    :mod:`dept_fast.checkpoint`). ``max_length`` is used only for checkpoints that do not record
    one (PEFT prompt tuning); a decoder-only model defaults it to its position limit minus the
    prompt, an encoder-decoder model with relative positions (T5) has no limit and needs it passed.
    ``share_prompt`` as in :func:`apply_dept`.
    """
    word_embeddings = _word_embeddings(model)
    state = read_checkpoint(path)
    if state.max_length is None and max_length is None:
        max_length = _position_limit(model, state.num_prompt_tokens)
    return _attach(model, build_embedding(state, word_embeddings, max_length), share_prompt)


def _word_embeddings(model: nn.Module) -> nn.Embedding:
    if not hasattr(model, "get_input_embeddings") or not hasattr(model, "config"):
        raise TypeError(f"expected a transformers model (with .config and .get_input_embeddings()), "
                        f"got {type(model).__name__}")
    embeddings = model.get_input_embeddings()
    if not isinstance(embeddings, nn.Embedding):
        raise TypeError(f"{type(model).__name__}.get_input_embeddings() is a {type(embeddings).__name__}, "
                        "not an nn.Embedding; DePT needs a plain embedding table")
    return embeddings


def _position_limit(model: nn.Module, num_prompt_tokens: int) -> Optional[int]:
    """Input positions a decoder-only model can hold after the prompt (None if it has no limit)."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is None or config.is_encoder_decoder:
        return None
    return limit - num_prompt_tokens


def _attach(model: nn.Module, adapter: FusedDePTEmbedding, share_prompt: Optional[bool]) -> nn.Module:
    if isinstance(getattr(model, ADAPTER_NAME, None), FusedDePTEmbedding):
        raise ValueError(f"{type(model).__name__} already has a DePT adapter (model.{ADAPTER_NAME}); "
                         "apply_dept/load_dept take a model without one")
    if share_prompt not in (None, True, False):
        raise TypeError(f"share_prompt must be None, True or False, got {share_prompt!r}")
    shared = _shared_prompt(model, adapter, share_prompt)
    adapter.share_prompt = shared is not None
    model.requires_grad_(False)
    model.add_module(ADAPTER_NAME, adapter)
    # E is the model's own tensor, saved under the model's name: keep it out of the adapter's state
    # (model.save_pretrained refuses untied shared tensors), and let load_state_dict reuse the model's.
    adapter.register_state_dict_post_hook(_drop_word_embeddings)
    adapter.register_load_state_dict_pre_hook(_reuse_word_embeddings)
    # Rank 0 leaves A (s x 0) and B (0 x d) empty: frozen, so DDP and optimizers never wait on them.
    for p in (adapter.lora_A, adapter.lora_B):
        p.requires_grad_(adapter.rank > 0)
    if model.config.is_encoder_decoder:
        encoder = model.get_encoder()
        model.register_forward_pre_hook(_Seq2SeqHook(adapter, model.forward), with_kwargs=True)
        encoder.register_forward_pre_hook(_EncoderHook(adapter, encoder.forward), with_kwargs=True)
    else:
        model.register_forward_pre_hook(_CausalLMHook(adapter, model.forward, shared), with_kwargs=True)
        if shared is not None:
            model.register_forward_hook(shared.add_prompt_loss, with_kwargs=True)
    return model


def _shared_prompt(model: nn.Module, adapter: FusedDePTEmbedding, share_prompt: Optional[bool]) -> Optional[SharedPrompt]:
    """The shared-prompt route for ``model`` (see :func:`apply_dept`), or None for the prompt in every row."""
    if share_prompt is False or adapter.num_prompt_tokens == 0:  # no prompt: nothing to share
        return None
    name = type(model).__name__
    if model.config.is_encoder_decoder:
        if share_prompt:
            raise ValueError(f"share_prompt=True: {name} is an encoder-decoder model; its encoder attends both "
                             "ways, so the prompt's keys/values depend on each row's input and cannot be shared")
        return None
    if hasattr(model, PREFIX_TUNING_NAME):
        if share_prompt:
            raise ValueError(f"share_prompt=True: {name} has Prefix-Tuning prefixes (model.{PREFIX_TUNING_NAME}), "
                             "which take the same attention argument as a shared prompt; use share_prompt=False")
        return None
    try:
        with prefix_attention_setup(model) as setup:
            pass
    except (TypeError, ValueError) as error:
        if share_prompt:
            raise type(error)(f"share_prompt=True cannot be exact on this model: {error}") from error
        return None
    return SharedPrompt(adapter, model, setup)


def _drop_word_embeddings(module: FusedDePTEmbedding, state_dict: Dict[str, Any], prefix: str, *_) -> None:
    state_dict.pop(prefix + "word_embeddings.weight", None)


def _reuse_word_embeddings(module: FusedDePTEmbedding, state_dict: Dict[str, Any], prefix: str, *_) -> None:
    state_dict.setdefault(prefix + "word_embeddings.weight", module.word_embeddings.weight.detach())


# ---------------------------------------------------------------------------------------------
# Building the inputs


def token_positions(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                    position_ids: Optional[torch.Tensor], past_tokens: int) -> torch.Tensor:
    """Each input token's position (its row of A): ``position_ids`` if given, else the index among
    its row's real tokens (``cumsum(mask) - 1`` over the whole mask, cached tokens included), else
    ``past_tokens + t``. Padding positions are set to 0. Returns (b, L) int64."""
    batch, length = input_ids.shape
    if position_ids is not None:
        if position_ids.dim() != 2 or position_ids.shape[-1] != length or position_ids.shape[0] not in (1, batch):
            raise ValueError(f"position_ids must have shape ({batch}, {length}) or (1, {length}), "
                             f"got {tuple(position_ids.shape)}")
        positions = position_ids.long().expand(batch, length)
    elif attention_mask is not None:
        positions = (attention_mask.long().cumsum(-1) - 1)[:, -length:]
    else:
        positions = torch.arange(past_tokens, past_tokens + length, device=input_ids.device).expand(batch, length)
    if attention_mask is not None:
        positions = positions.masked_fill(attention_mask[:, -length:] == 0, 0)
    return positions


def embed_tokens(adapter: FusedDePTEmbedding, input_ids: torch.Tensor, positions: torch.Tensor,
                 attention_mask: Optional[torch.Tensor], with_prompt: bool) -> torch.Tensor:
    """``[P ;] E[ids] + scaling * (A @ B)[positions]``: the fused kernel when every real token sits
    at its column, the PyTorch path otherwise."""
    if _positions_are_columns(positions, attention_mask):
        return adapter(input_ids, with_prompt=with_prompt)
    if positions.numel() and not torch.compiler.is_compiling():  # one host sync, as the fused path's id check
        low, high, low_id, high_id = torch.stack([*torch.aminmax(positions), *torch.aminmax(input_ids)]).tolist()
        if low < 0 or high >= adapter.max_length:
            raise ValueError(f"token positions span [{low}, {high}] but the DePT update covers [0, {adapter.max_length}) "
                             "(max_length; positions count a row's real tokens, generated ones included): shorten "
                             "the input or max_new_tokens, or build the adapter with a larger max_length")
        if low_id < 0 or high_id >= adapter.num_embeddings:
            raise ValueError(f"input_ids must lie in [0, {adapter.num_embeddings}) (the vocabulary size); "
                             f"found values in [{low_id}, {high_id}]")
    prompt = adapter.prompt if with_prompt else adapter.prompt[:0]
    return dept_embedding_at_positions_reference(input_ids, positions, adapter.weight, prompt, adapter.lora_A,
                                                 adapter.lora_B, adapter.scaling, adapter.word_embeddings.padding_idx)


def _positions_are_columns(positions: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> bool:
    """Whether every real token's position equals its column (one host sync; under torch.compile
    this answers False, which routes to the PyTorch path, correct for any positions)."""
    if torch.compiler.is_compiling():
        return False
    length = positions.shape[1]
    differs = positions != torch.arange(length, device=positions.device)
    if attention_mask is not None:
        differs &= attention_mask[:, -length:] != 0
    return not bool(differs.any())


def _prepend(tensor: torch.Tensor, count: int, value: int) -> torch.Tensor:
    head = torch.full((tensor.shape[0], count), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([head, tensor], dim=1)


# ---------------------------------------------------------------------------------------------
# Forward pre-hooks


class _Hook:
    """A forward pre-hook (``with_kwargs=True``) that rewrites a model's inputs for the adapter.

    A callable object rather than a closure, so ``copy.deepcopy(model)`` maps it onto the copy's adapter.
    """

    def __init__(self, adapter: FusedDePTEmbedding, forward) -> None:
        self.adapter = adapter
        params = inspect.signature(forward).parameters
        self.arg_names: List[str] = [p.name for p in params.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
        self.takes_position_ids = "position_ids" in params

    def bind(self, args: Tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """All arguments by name (positional ones mapped through the forward's signature)."""
        if len(args) > len(self.arg_names):
            raise TypeError(f"too many positional arguments ({len(args)}) for the model's forward")
        bound = dict(zip(self.arg_names, args))
        clash = set(bound) & set(kwargs)
        if clash:
            raise TypeError(f"got multiple values for argument(s) {sorted(clash)}")
        bound.update(kwargs)
        return bound

    def require_ids(self, kwargs: Dict[str, Any]) -> torch.Tensor:
        """The call's input_ids, after refusing what a DePT model cannot take."""
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("a DePT model builds inputs_embeds itself from input_ids (prompt + low-rank update); "
                             "pass input_ids instead of inputs_embeds")
        ids = kwargs.get("input_ids")
        if ids is None:
            raise ValueError("a DePT model needs input_ids")
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"a DePT model takes a 2-D attention_mask (batch, length), got shape "
                             f"{tuple(mask.shape)}; 4-D masks (e.g. from static caches) are not supported")
        return ids


def encoder_inputs(adapter: FusedDePTEmbedding, kwargs: Dict[str, Any], input_ids: torch.Tensor) -> Dict[str, Any]:
    """Encoder inputs ``[P ; E[ids] + update]`` with m ones prepended to the attention mask."""
    mask = kwargs.get("attention_mask")
    positions = token_positions(input_ids, mask, None, 0)
    kwargs["inputs_embeds"] = embed_tokens(adapter, input_ids, positions, mask, with_prompt=True)
    kwargs["input_ids"] = None
    if mask is not None:
        kwargs["attention_mask"] = _prepend(mask, adapter.num_prompt_tokens, 1)
    return kwargs


class _CausalLMHook(_Hook):
    """Decoder-only models: ``__call__`` validates the call and works out each token's position;
    the prompt then reaches the model by one of two routes, ``prompt_shared`` (``shared`` given:
    one prompt pass whose K/V every row attends to; the cache holds real tokens only) or
    ``prompt_in_sequence`` (prompt + update on the first pass, update only on cached steps).
    """

    def __init__(self, adapter: FusedDePTEmbedding, forward, shared: Optional[SharedPrompt]) -> None:
        super().__init__(adapter, forward)
        self.shared = shared

    def __call__(self, module: nn.Module, args: Tuple, kwargs: Dict[str, Any]):
        kwargs = self.bind(args, kwargs)
        input_ids = self.require_ids(kwargs)
        if kwargs.get("token_type_ids") is not None:
            raise ValueError("token_type_ids are not supported by a DePT model")
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
        positions = token_positions(input_ids, mask, kwargs.get("position_ids"), seen)
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


class _Seq2SeqHook(_Hook):
    """Encoder-decoder models: DePT inputs for the encoder, the prompt's mask columns for the decoder."""

    def __call__(self, module: nn.Module, args: Tuple, kwargs: Dict[str, Any]):
        kwargs = self.bind(args, kwargs)
        if kwargs.get("encoder_outputs") is None:
            return (), encoder_inputs(self.adapter, kwargs, self.require_ids(kwargs))
        mask = kwargs.get("attention_mask")
        if mask is not None:  # generate() ran the encoder already (through _EncoderHook)
            encoded = kwargs["encoder_outputs"][0].shape[1]
            m = self.adapter.num_prompt_tokens
            if encoded != mask.shape[1] + m:
                raise ValueError(f"encoder_outputs have {encoded} positions but attention_mask has {mask.shape[1]} "
                                 f"columns; with the {m} prompt tokens expected {mask.shape[1] + m}")
            kwargs["attention_mask"] = _prepend(mask, m, 1)
        return (), kwargs


class _EncoderHook(_Hook):
    """The encoder called on token ids directly (as ``generate()`` does): DePT inputs."""

    def __call__(self, module: nn.Module, args: Tuple, kwargs: Dict[str, Any]):
        kwargs = self.bind(args, kwargs)
        if kwargs.get("input_ids") is None:  # embeddings built by _Seq2SeqHook, or the caller's own
            return (), kwargs
        return (), encoder_inputs(self.adapter, kwargs, self.require_ids(kwargs))
