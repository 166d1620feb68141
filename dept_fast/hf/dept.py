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

  Generation steps (a cache already holds tokens) embed their new tokens ``E[ids]`` alone, with
  no update, for adapters attached with ``update_generated=False`` (the DePT authors' generation).
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
from typing import Any, Dict, NamedTuple, Optional, Union

import torch
from torch import nn

from ..checkpoint.dept import adapter_config, build_embedding, read_checkpoint
from ..distributed import refuse_sharded, refuse_zero3, zero3_module
from ..modules.dept_embedding import FusedDePTEmbedding, mixed_dept_embedding, table_size
from .adapters import DEPT, PREFIX, RowAdapters, adapters_of, call_names, refuse_taken, row_adapters
from .attach import attach, forward_arguments
from .peft_models import attach_through
from .positions import cached_length, generation_cache, positions_are_columns, token_positions
from .route import check_attention_window, check_route, prefix_route, route_of
from .shared_prompt import SharedPrompts
from .transaction import all_or_nothing
from .verify import TOKENS as PROBE_TOKENS
from .verify import DePTProbe, Refused, own_random_numbers, padding_moves_positions

DEFAULT_NAME = "default"


def apply_dept(model: nn.Module, num_prompt_tokens: int, rank: int, max_length: int,
               lora_alpha: float = 8.0, share_prompt: Optional[bool] = None,
               adapter_name: str = DEFAULT_NAME, update_generated: bool = True) -> nn.Module:
    """Freeze ``model`` and attach a fresh DePT adapter to its input embeddings
    (``model.dept_adapters[adapter_name]``; ``model.dept`` while its name is the active one).

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
            (encoder-decoders such as T5, whose encoder is bidirectional; sliding-window layers
            narrower than m + max_length, which would hide the prompt from later tokens). True: on, or a
            ValueError/TypeError saying why it cannot be exact on this model. False: the prompt in
            every row. ``model.dept.share_prompt`` tells which route was taken. With sharing, the
            logits cover the L input positions only (not m + L). All DePT adapters of a model take
            one route: None follows the first one's.
        adapter_name: the adapter's name (PEFT's convention); more adapters can be attached under
            other names, and a call picks one per row with ``adapter_names=[...]``
            (:mod:`dept_fast.hf.adapters`).
        update_generated: whether tokens of a pass that extends a generation cache (``generate()``'s
            steps after the first, or any forward given a non-empty cache) get the low-rank update too
            (True, at their positions) or ``E[ids]`` alone (False: the DePT authors' ``generate``,
            which adds the update only while ``past_key_values`` is None, and what vLLM computes,
            :mod:`dept_fast.vllm`). Stored as ``adapter.update_generated`` (settable); in a mixed batch
            each row follows its adapter's. Decoder-only models; an encoder-decoder's decoder tokens
            never get the update.

    Returns:
        The same model object, called exactly as before (``input_ids``, ``attention_mask``,
        ``labels``, ``generate``, plus ``adapter_names``); only the adapters' parameters require grad.
    """
    def attach_to(target: nn.Module) -> nn.Module:
        refuse_sharded(target)
        word_embeddings = _word_embeddings(target)
        _check_position_limit(target, num_prompt_tokens, max_length)
        with all_or_nothing(target):  # the adapter freezes E: undone with the rest if the attach is refused
            adapter = FusedDePTEmbedding(word_embeddings, num_prompt_tokens, rank, max_length, lora_alpha)
            return _attach(target, adapter_name, adapter, share_prompt, update_generated)

    return attach_through(model, attach_to)


def load_dept(model: nn.Module, path: Union[str, os.PathLike], share_prompt: Optional[bool] = None, *,
              max_length: Optional[int] = None, adapter_name: str = DEFAULT_NAME,
              update_generated: bool = True) -> nn.Module:
    """Freeze ``model`` and attach the DePT adapter saved in directory ``path`` as ``adapter_name``.

    Reads our format (``FusedDePTEmbedding.save_pretrained``), the DePT authors'
    ``PROMPT_TUNING_LORA`` checkpoints, PEFT ``PROMPT_TUNING`` checkpoints and whole-model saves of a
    DePT model (``model.save_pretrained``, the HF Trainer's ``save_model`` and checkpoints; see
    :mod:`dept_fast.checkpoint.dept`). ``max_length`` is used only for checkpoints that do not record
    one (PEFT prompt tuning); a decoder-only model defaults it to its position limit minus the
    prompt, an encoder-decoder model with relative positions (T5) has no limit and needs it passed.
    ``share_prompt``, ``adapter_name`` and ``update_generated`` as in :func:`apply_dept` (a whole-model
    save is read for its adapter of that name).
    """
    def attach_to(target: nn.Module) -> nn.Module:
        refuse_sharded(target)
        word_embeddings = _word_embeddings(target)
        refuse_taken(target, DEPT, adapter_name)
        checkpoint = read_checkpoint(path, table_size(word_embeddings)[1], max_length, adapter_name)
        config = checkpoint.config
        limit = _position_limit(target)
        if config.max_length is None and limit is not None and not target.config.is_encoder_decoder:
            checkpoint.config = config = dataclasses.replace(config, max_length=limit - config.num_prompt_tokens)
        _check_position_limit(target, config.num_prompt_tokens, config.max_length)
        with all_or_nothing(target):
            return _attach(target, adapter_name, build_embedding(checkpoint, word_embeddings), share_prompt,
                           update_generated)

    return attach_through(model, attach_to)


def _word_embeddings(model: nn.Module) -> nn.Embedding:
    if not hasattr(model, "get_input_embeddings") or not hasattr(model, "config"):
        raise TypeError(f"expected a transformers model (with .config and .get_input_embeddings()), "
                        f"got {type(model).__name__}")
    embeddings = model.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    if not isinstance(embeddings, nn.Module) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(model).__name__}.get_input_embeddings() is a {type(embeddings).__name__} without a "
                        "weight; DePT needs an embedding table")
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


def _attach(model: nn.Module, name: str, adapter: FusedDePTEmbedding, share_prompt: Optional[bool],
            update_generated: bool) -> nn.Module:
    """Attach ``adapter`` on its route and verify it (:mod:`dept_fast.hf.verify`); the caller undoes
    everything if this raises. A shared prompt that the self-check refuses falls back to the prompt in
    every row unless ``share_prompt=True`` or the model's DePT adapters already share."""
    refuse_taken(model, DEPT, name)
    if share_prompt not in (None, True, False):
        raise TypeError(f"share_prompt must be None, True or False, got {share_prompt!r}")
    if not isinstance(update_generated, bool):
        raise TypeError(f"update_generated must be True or False, got {update_generated!r}")
    adapter.update_generated = update_generated
    if model.config.is_encoder_decoder and share_prompt:
        raise ValueError(f"share_prompt=True: {type(model).__name__} is an encoder-decoder model; its encoder "
                         "attends both ways, so the prompt's keys/values depend on each row's input and cannot "
                         "be shared")
    _prepare(adapter)
    shared = not model.config.is_encoder_decoder and _share_prompt(model, name, adapter, share_prompt)
    probe = DePTProbe.prepare(model, adapter.word_embeddings)
    if shared:
        sharing = bool(adapters_of(model, DEPT))  # the model's route, taken by every adapter
        try:
            with all_or_nothing(model):
                with prefix_route(model):
                    pass
                return _attach_on_route(model, name, adapter, True, probe)
        except (TypeError, ValueError) as error:  # refused by the route or by the self-check
            if share_prompt:
                raise type(error)(f"share_prompt=True cannot be exact on this model: {error}") from error
            if sharing:
                raise
    return _attach_on_route(model, name, adapter, False, probe)


def _prepare(adapter: FusedDePTEmbedding) -> None:
    """What every attached adapter needs, whatever its route: rank 0 leaves A (s x 0) and B (0 x d)
    empty and frozen (DDP and optimizers never wait on them); E is the model's own tensor, saved under
    the model's name: kept out of the adapter's state (model.save_pretrained refuses untied shared
    tensors), and load_state_dict reuses the model's."""
    for p in (adapter.lora_A, adapter.lora_B):
        p.requires_grad_(adapter.rank > 0)
    adapter.register_state_dict_post_hook(_drop_word_embeddings)
    adapter.register_load_state_dict_pre_hook(_reuse_word_embeddings)


def _attach_on_route(model: nn.Module, name: str, adapter: FusedDePTEmbedding, shared: bool,
                     probe: Optional[DePTProbe]) -> nn.Module:
    """Register ``adapter`` with the hooks of its route (``shared``: the shared prompt) and run the
    self-check; raises :class:`Refused` if it does not hold."""
    adapter.share_prompt = shared
    config = adapter_config(adapter).to_json()
    if model.config.is_encoder_decoder:
        encoder = model.get_encoder()
        attach(model, DEPT, name, adapter, config, lambda: [
            (model, "pre", Seq2SeqInputs(model.forward)), (encoder, "pre", EncoderInputs(encoder.forward, model))])
    else:
        attach(model, DEPT, name, adapter, config, lambda: [])
        inputs = decoder_inputs(model)
        if shared and inputs.shared is None:
            inputs.shared = SharedPrompts(model, route_of(model))
    if probe is not None:
        probe.verify(model, lambda m, rank: _probe_adapter(adapter, m, rank))
    return model


def _probe_adapter(adapter: FusedDePTEmbedding, num_prompt_tokens: int, rank: int) -> FusedDePTEmbedding:
    """A probe adapter for the self-check: around ``adapter``'s embeddings, on its route, B zero."""
    with own_random_numbers(adapter.weight.device):
        probe = FusedDePTEmbedding(adapter.word_embeddings, num_prompt_tokens, rank, PROBE_TOKENS,
                                   adapter.lora_alpha, embed_scale=adapter.embed_scale)
    probe.share_prompt, probe.update_generated = adapter.share_prompt, adapter.update_generated
    return probe


def decoder_inputs(model: nn.Module) -> "DecoderInputs":
    """The causal decoder's one :class:`DecoderInputs` pre-hook (and the shared prompts' loss hook),
    registered by the first adapter of any kind attached to it."""
    for hook in model._forward_pre_hooks.values():
        if isinstance(hook, DecoderInputs):
            return hook
    hook = DecoderInputs(model.forward)
    hook.padding_moves_positions = not hook.takes_position_ids and padding_moves_positions(model)
    model.register_forward_pre_hook(hook, with_kwargs=True)
    model.register_forward_hook(hook.add_prompt_loss, with_kwargs=True)
    return hook


def _share_prompt(model: nn.Module, name: str, adapter: FusedDePTEmbedding, share_prompt: Optional[bool]) -> bool:
    """Whether a decoder's new DePT adapter is to share its prompt (see :func:`apply_dept`), from what can
    be checked without changing the model (the self-check then verifies the route); a model's adapters
    all take the route of its first."""
    existing = list(adapters_of(model, DEPT).values())
    if existing:
        shared = existing[0].share_prompt
        if share_prompt is not None and share_prompt != shared:
            raise ValueError(f"share_prompt={share_prompt}: the DePT adapters {list(adapters_of(model, DEPT))} of this "
                             f"model take share_prompt={shared}; all DePT adapters of a model take one route")
        if shared and name in adapters_of(model, PREFIX):
            raise ValueError(f"{type(model).__name__} has Prefix-Tuning prefixes named {name!r}, which take the same "
                             "attention argument as a shared prompt: attach this DePT adapter under another name")
        if shared:
            try:
                check_attention_window(model, adapter.num_prompt_tokens + adapter.max_length)
            except ValueError as error:
                raise ValueError(f"the DePT adapters of this model share their prompts (all take one route), "
                                 f"which cannot be exact for this adapter: {error}") from error
        return shared
    if share_prompt is False or adapter.num_prompt_tokens == 0:  # no prompt: nothing to share
        return False
    if "position_ids" not in inspect.signature(model.forward).parameters:
        if share_prompt:
            raise ValueError(f"share_prompt=True cannot be exact on this model: {type(model).__name__}.forward takes "
                             "no position_ids, so its inputs cannot be placed after a shared prompt")
        return False
    if name in adapters_of(model, PREFIX):
        if share_prompt:
            raise ValueError(f"share_prompt=True: {type(model).__name__} has Prefix-Tuning prefixes named {name!r}, "
                             "which take the same attention argument as a shared prompt; use share_prompt=False")
        return False
    try:
        if route_of(model) is None:
            check_route(model)
        check_attention_window(model, adapter.num_prompt_tokens + adapter.max_length)
        return True
    except (TypeError, ValueError) as error:
        if share_prompt:
            raise type(error)(f"share_prompt=True cannot be exact on this model: {error}") from error
        return False


def _drop_word_embeddings(module: FusedDePTEmbedding, state_dict: Dict[str, Any], prefix: str, *_) -> None:
    """The embedding module's tensors (E, and a wrapper's own, e.g. LoRA's) belong to the model."""
    for key in [key for key in state_dict if key.startswith(prefix + "word_embeddings.")]:
        del state_dict[key]


def _reuse_word_embeddings(module: FusedDePTEmbedding, state_dict: Dict[str, Any], prefix: str, *_) -> None:
    for key, tensor in module.word_embeddings.state_dict().items():
        state_dict.setdefault(prefix + "word_embeddings." + key, tensor)


# ---------------------------------------------------------------------------------------------
# Building the inputs


def embed_tokens(rows: RowAdapters, input_ids: torch.Tensor, positions: torch.Tensor,
                 attention_mask: Optional[torch.Tensor], with_prompt: bool, generated: bool = False) -> torch.Tensor:
    """``[P ;] E[ids] + scaling * (A @ B)[positions]`` through the rows' adapters: the fused stage
    when every real token sits at its column, the per-position path otherwise. ``generated``: the pass
    extends a generation cache, where rows whose adapter has ``update_generated=False`` take ``E[ids]``."""
    if generated and not all(a.update_generated for a in rows.adapters):
        keep = [i for i, a in enumerate(rows.adapters) if a.update_generated]
        if not keep:
            return rows.adapters[0].word_embeddings(input_ids)
        renumber = torch.full((len(rows.adapters) + 1,), -1, dtype=torch.long, device=rows.index.device)
        renumber[keep] = torch.arange(len(keep), device=rows.index.device)  # index -1 reads the last entry: -1
        rows = RowAdapters(tuple(rows.names[i] for i in keep), tuple(rows.adapters[i] for i in keep),
                           renumber[rows.index])
    columns = positions_are_columns(positions, attention_mask)
    if rows.uniform:
        adapter = zero3_module(rows.adapters[0])
        return adapter(input_ids, with_prompt=with_prompt, positions=None if columns else positions)
    refuse_zero3(rows.adapters, "a batch mixing DePT adapters (adapter_names)")
    return mixed_dept_embedding(rows.adapters, rows.index, input_ids, with_prompt=with_prompt,
                                positions=None if columns else positions)


class PromptSlots(NamedTuple):
    """The prompt slots before a call's tokens (prompt in every row): ``count`` M (the longest
    prompt), each row's prompt length ``lengths`` (an int when all rows share one adapter, else (b, 1):
    a shorter prompt is left-padded, its padding masked)."""

    count: int
    lengths: Union[int, torch.Tensor]

    @classmethod
    def of(cls, rows: RowAdapters) -> "PromptSlots":
        counts = [a.num_prompt_tokens for a in rows.adapters]
        if rows.uniform:
            return cls(counts[0], counts[0])
        table = torch.tensor(counts + [0], device=rows.index.device)  # index -1: no adapter, no prompt
        return cls(max(counts), table[rows.index][:, None])

    def mask(self, batch: int, device: torch.device) -> torch.Tensor:
        """(b, M): 1 on each row's prompt slots, 0 on its padding."""
        return (torch.arange(self.count, device=device) >= self.count - self.lengths).long().expand(batch, -1)

    def positions(self, batch: int, device: torch.device) -> torch.Tensor:
        """(b, M): model positions of the prompt slots (0..m-1 after the padding, 0 on it)."""
        return (torch.arange(self.count, device=device) - (self.count - self.lengths)).clamp_min(0).expand(batch, -1)


def first_label_first(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``labels`` with each row's first real label (at its first unmasked column) moved to column 0,
    its own column then ignored (-100). Column 0 is the one a prompt's last position predicts (or
    nothing, for a row without a prompt: causal LMs drop it), so a left-padded row's loss is the
    row's alone, instead of its last padding slot predicting its first token."""
    first = attention_mask.long().argmax(-1, keepdim=True)
    moved = labels.scatter(1, first, -100)
    return torch.cat([labels.gather(1, first), moved[:, 1:]], dim=1)


def _prepend(tensor: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    return torch.cat([head.to(tensor.dtype), tensor], dim=1)


class _Inputs:
    """A forward pre-hook (``with_kwargs=True``) that rewrites a model's inputs for its DePT adapters.

    A callable object rather than a closure, so ``copy.deepcopy(model)`` maps it onto the copy. It
    holds configuration only: everything of one call stays in that call.
    """

    def __init__(self, forward) -> None:
        self.signature = inspect.signature(forward)
        self.takes_position_ids = "position_ids" in self.signature.parameters

    def arguments(self, args: tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """The call's arguments by name, after refusing token types and input ids a DePT model cannot take."""
        kwargs = forward_arguments(self.signature, args, kwargs)
        if kwargs.get("token_type_ids") is not None:
            raise ValueError("token_type_ids are not supported by a DePT model")
        ids = kwargs.get("input_ids")
        if ids is not None and (not isinstance(ids, torch.Tensor) or ids.dim() != 2):
            shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"a DePT model takes 2-D input_ids (batch, length), got {shape}; "
                             "for a single sequence pass input_ids.unsqueeze(0)")
        return kwargs

    def check_mask(self, kwargs: Dict[str, Any]) -> None:
        """Refuse attention masks other than (batch, length) in a call that some row's DePT adapter takes."""
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"a DePT model takes a 2-D attention_mask (batch, length), got {shape}; 4-D masks "
                             "and per-layer mask dicts (from static or compiled caches) are not supported")

    @staticmethod
    def rows(model: nn.Module, kwargs: Dict[str, Any]) -> RowAdapters:
        """Each row's DePT adapter for this call (``adapter_names``, or the active adapter); no rows
        take one when the call has no inputs (then the model's own checks speak)."""
        inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if inputs is None:
            return RowAdapters((), (), None)
        return row_adapters(model, DEPT, call_names(kwargs), inputs.shape[0], inputs.device)

    @staticmethod
    def require_ids(kwargs: Dict[str, Any]) -> torch.Tensor:
        """The call's input_ids; inputs_embeds are refused (the adapter builds them)."""
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("a DePT model builds inputs_embeds itself from input_ids (prompt + low-rank update); "
                             "pass input_ids instead of inputs_embeds")
        ids = kwargs.get("input_ids")
        if ids is None:
            raise ValueError("a DePT model needs input_ids")
        return ids


def encoder_inputs(rows: RowAdapters, kwargs: Dict[str, Any], input_ids: torch.Tensor) -> Dict[str, Any]:
    """Encoder inputs ``[P ; E[ids] + update]``, laid out by :func:`encoder_layout`, and the mask to match."""
    mask = kwargs.get("attention_mask")
    positions = token_positions(*input_ids.shape, input_ids.device, mask, None, 0)
    embeds = embed_tokens(rows, input_ids, positions, mask, with_prompt=True)
    slots = PromptSlots.of(rows)
    kwargs["inputs_embeds"] = encoder_layout(embeds, mask, slots)
    kwargs["input_ids"] = None
    return _with_prompt_mask(kwargs, "attention_mask", slots, input_ids.shape[0], input_ids.device)


def _encoder_order(mask: Optional[torch.Tensor], slots: PromptSlots, batch: int, length: int,
                   device: torch.device) -> Optional[torch.Tensor]:
    """(b, M + L) source column of each column of :func:`encoder_layout`; None where the layout is the
    stage's own (no row left-padded, every prompt M long)."""
    count, real = slots.count, slots.lengths
    first = torch.zeros(batch, 1, dtype=torch.long, device=device) if mask is None else \
        mask.long().argmax(-1, keepdim=True)  # a row of padding only: 0
    if not torch.compiler.is_compiling() and isinstance(real, int) and (mask is None or not bool(first.any())):
        return None
    pad = count - real  # each row's prompt padding slots
    j = torch.arange(count + length, device=device).expand(batch, -1)
    return torch.where(j < first, count + j, torch.where(j < first + real, pad + j - first,
                                                          torch.where(j < length + real, count + j - real,
                                                                      j - length - real)))


def encoder_layout(tensor: torch.Tensor, mask: Optional[torch.Tensor], slots: PromptSlots) -> torch.Tensor:
    """``tensor`` (b, M + L, ...) laid out as the stage gives it, ``[prompt padding ; P_a ; tokens]``,
    rearranged per row to ``[token padding before the first real token ; P_a ; the tokens from there ;
    prompt padding]``: each row's prompt sits just before its first real token and the padding of
    shorter prompts goes last. The encoder attends both ways and masks padding wherever it is, so each
    row then sees its prompt and tokens as the row alone does, under absolute positions (BART: a
    left-padded row's padding counts before the prompt as it counts before the tokens in the plain
    model) and relative ones (T5: the prompt and the tokens side by side)."""
    order = _encoder_order(mask, slots, tensor.shape[0], tensor.shape[1] - slots.count, tensor.device)
    if order is None:
        return tensor
    index = order.view(order.shape + (1,) * (tensor.dim() - 2)).expand(order.shape + tensor.shape[2:])
    return tensor.gather(1, index)


def _with_prompt_mask(kwargs: Dict[str, Any], key: str, slots: PromptSlots, batch: int,
                      device: torch.device) -> Dict[str, Any]:
    """``kwargs[key]`` (a mask over the caller's tokens) with the prompt slots' columns, laid out as
    :func:`encoder_layout` lays out the encoder's inputs; a missing mask stays missing unless rows'
    prompts differ in length (their padding needs masking)."""
    mask = kwargs.get(key)
    if mask is None and isinstance(slots.lengths, int):
        return kwargs
    full = torch.ones(batch, kwargs["inputs_embeds"].shape[1] - slots.count, dtype=torch.long, device=device) \
        if mask is None else mask
    kwargs[key] = encoder_layout(_prepend(full, slots.mask(batch, device)), mask, slots)
    return kwargs


class DecoderInputs(_Inputs):
    """Decoder-only models, one per model whatever its adapters: ``__call__`` validates the call,
    puts each row's first real label first (:func:`first_label_first`), finds each row's DePT
    adapter and each token's position; the prompts then reach the model by one of two routes,
    ``prompt_shared`` (``shared`` set: one prompt pass whose K/V the rows attend to; the cache holds
    real tokens only) or ``prompt_in_sequence`` (prompt + update on the first pass, update only on
    cached steps). A call in which no row takes a DePT adapter runs as the plain model.
    """

    def __init__(self, forward) -> None:
        super().__init__(forward)
        self.shared: Optional[SharedPrompts] = None
        self.padding_moves_positions = False
        """Whether a masked slot before a row's tokens moves their positions (a model that takes no
        position_ids and counts columns, e.g. BartForCausalLM; see :func:`padding_moves_positions`)."""

    def add_prompt_loss(self, model: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any) -> Any:
        """Forward hook: the shared prompts' loss term (see :meth:`SharedPrompts.add_prompt_loss`)."""
        return None if self.shared is None else self.shared.add_prompt_loss(model, args, kwargs, output)

    def check_mask(self, kwargs: Dict[str, Any]) -> None:
        """First the generation cache: a decoder's holds the prompt's positions (or sits behind the
        shared prompt's prefix attention, which needs the 2-D mask), so fixed-size caches, which come
        with a prebuilt 4-D mask or per-layer mask dict (``cache_implementation="static"``, a
        ``StaticCache``, compiled generation), are refused by name; then the mask."""
        cache = generation_cache(kwargs)
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError(f"a decoder-only DePT model needs a dynamic generation cache (generate()'s default); "
                             f"got a {type(cache).__name__} (cache_implementation='static' or a compiled "
                             "generation), whose fixed-size layers and prebuilt masks cannot hold the prompt")
        super().check_mask(kwargs)

    def __call__(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]):
        kwargs = self.arguments(args, kwargs)
        rows = self.rows(module, kwargs)
        if rows.adapters:  # a call no DePT adapter takes (e.g. Prefix-Tuning alone) keeps any cache and mask
            self.check_mask(kwargs)
        mask = kwargs.get("attention_mask")
        if kwargs.get("labels") is not None and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            kwargs["labels"] = first_label_first(kwargs["labels"], mask)
        if not rows.adapters:
            return (), kwargs
        input_ids = self.require_ids(kwargs)
        slots = PromptSlots.of(rows)
        past = cached_length(kwargs)
        cached_prompt = 0 if self.shared is not None else slots.count  # prompt slots a cache of this model holds
        if 0 < past < cached_prompt:
            raise ValueError(f"the cache holds {past} tokens, fewer than the {cached_prompt} prompt slots: it was not "
                             "built by this DePT model for these adapters")
        seen = max(past - cached_prompt, 0)  # the caller's tokens already in the cache
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape[1] != seen + input_ids.shape[1]:
            raise ValueError(f"attention_mask has {mask.shape[1]} columns, expected {seen + input_ids.shape[1]} "
                             f"({seen} cached + {input_ids.shape[1]} new tokens; the prompt is added by the model)")
        positions = token_positions(*input_ids.shape, input_ids.device, mask, kwargs.get("position_ids"), seen)
        if self.shared is not None:
            return (), self.prompt_shared(module, kwargs, rows, input_ids, positions, generated=past > 0)
        return (), self.prompt_in_sequence(kwargs, rows, slots, input_ids, positions, first_pass=past == 0, seen=seen)

    def prompt_shared(self, module: nn.Module, kwargs: Dict[str, Any], rows: RowAdapters, input_ids: torch.Tensor,
                      positions: torch.Tensor, generated: bool) -> Dict[str, Any]:
        """The rows carry their tokens alone, ``inputs_embeds`` (b, L, d) at positions m + pos; the
        prompts' K/V come from :class:`SharedPrompts` (model positions are shifted there)."""
        kwargs["inputs_embeds"] = embed_tokens(rows, input_ids, positions, kwargs.get("attention_mask"),
                                               with_prompt=False, generated=generated)
        kwargs["input_ids"] = None
        if self.takes_position_ids:
            kwargs["position_ids"] = positions
        return self.shared.input_kwargs(module, kwargs, rows, shift_positions=self.takes_position_ids)

    def prompt_in_sequence(self, kwargs: Dict[str, Any], rows: RowAdapters, slots: PromptSlots,
                           input_ids: torch.Tensor, positions: torch.Tensor, first_pass: bool,
                           seen: int) -> Dict[str, Any]:
        """Every row carries its prompt: ``inputs_embeds`` (b, M + L, d) on the first pass, each prompt
        left-padded to the longest M and its padding masked."""
        batch, device = input_ids.shape[0], input_ids.device
        if first_pass and self.padding_moves_positions and not isinstance(slots.lengths, int) \
                and bool((slots.lengths != slots.count).any()):
            raise ValueError("this model's forward takes no position_ids, so in a batch whose rows' prompts differ in "
                             "length (adapter_names with different num_prompt_tokens, or '__base__' rows) the padding "
                             "before a shorter prompt would move its tokens' positions; give a batch one prompt "
                             "length")
        given_mask, given_positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        kwargs["inputs_embeds"] = embed_tokens(rows, input_ids, positions, given_mask, with_prompt=first_pass,
                                               generated=not first_pass)
        kwargs["input_ids"] = None
        if given_mask is not None or not rows.uniform:
            if given_mask is None:  # every cached and new token is real (generate() drops an all-ones mask)
                given_mask = torch.ones(batch, seen + input_ids.shape[1], dtype=torch.long, device=device)
            kwargs["attention_mask"] = _prepend(given_mask, slots.mask(batch, device))
        if first_pass and kwargs.get("labels") is not None:  # a row without a prompt predicts no first label
            labels = kwargs["labels"]
            labels = torch.cat([labels[:, :1].masked_fill(torch.as_tensor(slots.lengths == 0, device=device), -100),
                                labels[:, 1:]], dim=1)
            kwargs["labels"] = _prepend(labels, torch.full((batch, slots.count), -100, device=device))
        if self.takes_position_ids and (given_mask is not None or given_positions is not None):
            model_positions = positions + slots.lengths
            if first_pass:
                model_positions = torch.cat([slots.positions(batch, device), model_positions], dim=1)
            kwargs["position_ids"] = model_positions
        return kwargs


class Seq2SeqInputs(_Inputs):
    """Encoder-decoder models: DePT inputs for the encoder, the prompt slots' mask columns for the decoder."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]):
        kwargs = self.arguments(args, kwargs)
        self.check_mask(kwargs)
        if kwargs.get("encoder_outputs") is None:
            rows = self.rows(module, kwargs)
            return (), encoder_inputs(rows, kwargs, self.require_ids(kwargs)) if rows.adapters else kwargs
        mask = kwargs.get("attention_mask")
        encoded = kwargs["encoder_outputs"][0]
        rows = row_adapters(module, DEPT, call_names(kwargs), encoded.shape[0], encoded.device)
        if mask is not None and rows.adapters:  # generate() ran the encoder already (through EncoderInputs)
            slots = PromptSlots.of(rows)
            if encoded.shape[1] != mask.shape[1] + slots.count:
                raise ValueError(f"encoder_outputs have {encoded.shape[1]} positions but attention_mask has "
                                 f"{mask.shape[1]} columns; with the {slots.count} prompt slots expected "
                                 f"{mask.shape[1] + slots.count}")
            kwargs = _with_prompt_mask(kwargs, "attention_mask", slots, encoded.shape[0], encoded.device)
        return (), kwargs


class EncoderInputs(_Inputs):
    """The encoder called on token ids directly (as ``generate()`` does): DePT inputs."""

    def __init__(self, forward, model: nn.Module) -> None:
        super().__init__(forward)
        self.model = model

    def __call__(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]):
        kwargs = self.arguments(args, kwargs)
        self.check_mask(kwargs)
        if kwargs.get("input_ids") is None:  # embeddings built by Seq2SeqInputs, or the caller's own
            return (), kwargs
        rows = self.rows(self.model, kwargs)
        return (), encoder_inputs(rows, kwargs, self.require_ids(kwargs)) if rows.adapters else kwargs
