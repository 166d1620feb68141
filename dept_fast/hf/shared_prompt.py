"""The shared soft prompt: in a causal decoder, DePT's prompt runs once and every row attends to it.

Why it is exact. The m prompt positions come first and, under causal attention, attend only to
each other, so their hidden states, and so every layer's keys and values for them, are the same in
every row of a batch whatever the row's input or padding. One batch-1 pass of the prompt
(positions 0..m-1) captures each layer's (key, value); the b x L input tokens then run at
positions m, m+1, ... with those K/V joined before their own (expanded to the batch: a view)
through the prefix attention (:mod:`dept_fast.hf.attention`), the route Prefix-Tuning uses and
gradient checkpointing replays. Autograd sums every row's gradient into the one prompt pass. With
dropout active (training), the prompt's activations draw one dropout mask for the whole batch
instead of one per row; in eval mode, or without dropout, the numbers are those of the prompt in
every row. Layers that do not let every token see every earlier position (sliding windows narrower
than m + max_length, chunked attention) would hide the prompt from later tokens: they are refused
(:func:`dept_fast.hf.route.check_attention_window`).

The loss. With the prompt in every row, the last prompt position predicts the first input token.
The prompt pass computes that logit once (1 x V) and :meth:`SharedPrompts.add_prompt_loss` adds its
term to the input positions' terms, reduced as the model's own loss reduces (sum over targets /
their count, or ``num_items_in_batch`` when given): the prompt-in-every-row loss. The returned
logits (and hidden states, attentions) cover the L input positions only; a (b, m + L, V) tensor is
never built. The labels and the prompt's logit travel from the pre-hook to the forward hook inside
the call's own ``dept_prefix`` kwarg, so concurrent calls on one model never see each other's.

Several adapters (a mixed batch): the prompts of the call's k distinct adapters run as one batch-k
pass (left-padded to the longest, the padding masked and its K/V zeroed), and each row attends to
its own adapter's prompt K/V and takes its own prompt's last logit for the loss.

When the prompt pass runs. By default once per call: it is a forward of m tokens (batch 1), next to
the call's b x L. Two scopes reuse it, both where it is provably unchanged:
* one ``generate()`` call: the pass of the first step is kept on that call's generation cache
  object and read by the later steps (recomputed when gradients are recorded);
* :func:`serving`: a context the user opens, promising that no weight changes inside it; the first
  call without gradients computes the pass, every later one (from any thread) reuses it.
Nothing else is cached, so no change to a weight (an optimizer step, ``load_state_dict``, ``.data``
writes, ``.to()``) can leave a stale prompt behind.
"""
import inspect
import threading
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import zero3_module
from ..modules.dept_embedding import FusedDePTEmbedding
from .adapters import BASE, ROWS_KWARG, RowAdapters
from .attach import prefix_pass
from .attention import PREFIX_KWARG, KeyValue
from .positions import generation_cache
from .route import PrefixRoute

SERVING_ATTR = "_dept_fast_serving"
CACHE_ATTR = "_dept_fast_prompt_states"


class PromptStates(NamedTuple):
    """What one pass of the prompts of a call's k adapters (batch k) leaves for the input pass."""

    key_values: List[KeyValue]
    """Per layer slot, the prompts' (key, value), each (k, kv_heads, M, head_dim), M the longest prompt."""
    valid: Optional[torch.Tensor]
    """(k, M) bool: the real slots of each prompt (shorter ones are left-padded); None: all (k = 1)."""
    logits: torch.Tensor
    """(k, 1, V): each prompt's last position's logits, which predict the first input token."""


class PendingLoss(NamedTuple):
    """The input pass's labels, the prompts' last logits and each row's prompt (-1: none; None: every
    row the first), from the pre-hook to the forward hook."""

    labels: torch.Tensor
    prompt_logits: torch.Tensor
    source: Optional[torch.Tensor]


class _Serving:
    """The prompt passes computed inside one :func:`serving` context (per set of adapters), under a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.states: Dict[Tuple[FusedDePTEmbedding, ...], PromptStates] = {}


@contextmanager
def serving(model: nn.Module) -> Iterator[nn.Module]:
    """Reuse the shared prompts' pass across calls while the context is open (inference servers).

    Inside, the caller promises that no weight of ``model`` changes. The first call without
    gradients (eval mode, ``torch.no_grad()``/``inference_mode()``, or ``generate()``) of a set of
    adapters runs their prompt pass; every later such call, from any thread, reuses it, so a request
    costs only its own tokens attending to the prompt. Calls with gradients or in train mode compute
    their own pass. Closing the context drops the kept passes. Without the context, each call (or
    each ``generate()``) runs the prompt pass once.
    """
    if model.__dict__.get(SERVING_ATTR) is not None:
        raise RuntimeError(f"dept_fast.serving is already open on this {type(model).__name__}")
    model.__dict__[SERVING_ATTR] = _Serving()
    try:
        yield model
    finally:
        model.__dict__.pop(SERVING_ATTR, None)


class SharedPrompts:
    """The shared-prompt route of a model's DePT adapters (see the module docstring).

    Owned by the decoder-only forward hooks of :mod:`dept_fast.hf.dept`: the pre-hook calls
    :meth:`input_kwargs` to turn the caller's kwargs (``inputs_embeds`` already holding the tokens
    without the prompt) into those of the input pass; :meth:`add_prompt_loss`, a forward hook,
    completes the loss. Holds configuration only, nothing of any one call.
    """

    def __init__(self, model: nn.Module, route: PrefixRoute) -> None:
        self.route = route
        self.num_layers = route.layouts["decoder"][0]
        parameters = inspect.signature(model.forward).parameters
        self.takes_logits_to_keep = "logits_to_keep" in parameters
        self.takes_position_ids = "position_ids" in parameters

    def states(self, model: nn.Module, kwargs: Dict[str, Any],
               adapters: Tuple[FusedDePTEmbedding, ...]) -> PromptStates:
        """This call's prompt pass for ``adapters``: computed now, or reused from the call's generation
        cache or an open :func:`serving` context when no gradient is recorded."""
        if torch.is_grad_enabled():
            return self._prompt_pass(model, adapters)
        serving_scope = model.__dict__.get(SERVING_ATTR)
        if serving_scope is not None and not model.training:
            with serving_scope.lock:
                if adapters not in serving_scope.states:
                    serving_scope.states[adapters] = self._prompt_pass(model, adapters)
                return serving_scope.states[adapters]
        cache = generation_cache(kwargs)
        if cache is None:
            return self._prompt_pass(model, adapters)
        kept = cache.__dict__.setdefault(CACHE_ATTR, {})
        if adapters not in kept:
            kept[adapters] = self._prompt_pass(model, adapters)
        return kept[adapters]

    def _prompt_pass(self, model: nn.Module, adapters: Tuple[FusedDePTEmbedding, ...]) -> PromptStates:
        """Run the prompts alone (batch k, each at positions 0..m-1, left-padded to the longest)
        through ``model.forward`` (not ``model(...)``, whose DePT pre-hook is for token ids) and
        capture every layer's K/V. Padding slots' K/V are zeroed (they are never attended to)."""
        lengths = [a.num_prompt_tokens for a in adapters]
        longest = max(lengths)
        # Each P through its adapter's forward (no token ids), where an engine has gathered its parameters.
        no_ids = torch.empty((1, 0), dtype=torch.long, device=adapters[0].weight.device)
        prompts = torch.cat([F.pad(zero3_module(a)(no_ids), (0, 0, longest - a.num_prompt_tokens, 0))
                             for a in adapters])
        kwargs: Dict[str, Any] = {"inputs_embeds": prompts, "use_cache": False, ROWS_KWARG: [BASE] * len(adapters)}
        valid = None
        if min(lengths) != longest:
            if not self.takes_position_ids:
                raise ValueError(f"{type(model).__name__}.forward takes no position_ids, so prompts of different "
                                 "lengths cannot share one prompt pass")
            pad = longest - torch.tensor(lengths, device=prompts.device)[:, None]
            slots = torch.arange(longest, device=prompts.device)
            valid = slots >= pad
            kwargs.update(attention_mask=valid.long(), position_ids=(slots - pad).clamp_min(0))
        captured: Dict[int, KeyValue] = {}
        kwargs = prefix_pass(kwargs, capture=captured)
        if self.takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        output = model.forward(**kwargs)
        missing = set(range(self.num_layers)) - set(captured)
        if missing:
            raise RuntimeError(f"the prompt pass did not reach the attention of layer slot(s) {sorted(missing)}")
        key_values = [captured[slot] for slot in range(self.num_layers)]
        if valid is not None:
            keep = valid[:, None, :, None]
            key_values = [(k.masked_fill(~keep, 0), v.masked_fill(~keep, 0)) for k, v in key_values]
        return PromptStates(key_values, valid, _logits(output)[:, -1:])

    def input_kwargs(self, model: nn.Module, kwargs: Dict[str, Any], rows: RowAdapters,
                     shift_positions: bool) -> Dict[str, Any]:
        """The input pass's kwargs: the prompts' K/V as each row's prefix, ``position_ids`` after it,
        the caller's mask as it is (the prefix attention adds the prompt's columns), labels held back
        (in the call's kwarg) for :meth:`add_prompt_loss`."""
        self.route.begin_pass(model)
        prompted = tuple(a for a in rows.adapters if a.num_prompt_tokens > 0)
        if not prompted:  # update-only adapters (m = 0): nothing to attend to
            return kwargs
        source = rows.index
        if len(prompted) < len(rows.adapters):
            position = [prompted.index(a) if a in prompted else -1 for a in rows.adapters]
            table = torch.tensor(position + [-1], device=source.device)  # index -1: no adapter
            source = table[source]
        states = self.states(model, kwargs, prompted)
        labels = kwargs.get("labels")
        pending = None if labels is None else PendingLoss(labels, states.logits, source)
        kwargs["labels"] = None
        return prefix_pass(kwargs, states.key_values, source, states.valid, shift_positions=shift_positions,
                           state=pending)

    def add_prompt_loss(self, model: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any) -> Any:
        """Forward hook (``with_kwargs=True``): the loss over the input positions plus the first input
        token's term from the row's prompt's last logit, put first in the output as the model would."""
        spec = kwargs.get(PREFIX_KWARG)
        pending: Optional[PendingLoss] = getattr(spec, "state", None)
        if not isinstance(pending, PendingLoss):
            return None
        logits = _logits(output)
        labels = pending.labels
        if tuple(labels.shape) != tuple(logits.shape[:2]):
            raise ValueError(f"labels have shape {tuple(labels.shape)} but the logits cover {tuple(logits.shape[:2])} "
                             "(batch, input positions); with a shared prompt, labels are the inputs' alone")
        loss = shared_prompt_loss(model.loss_function, logits, pending.prompt_logits, labels,
                                  kwargs.get("num_items_in_batch"), pending.source)
        if isinstance(output, tuple):
            return (loss,) + output
        return type(output)(**{"loss": loss, **{name: value for name, value in output.items() if name != "loss"}})


def shared_prompt_loss(loss_function, logits: torch.Tensor, prompt_logits: torch.Tensor, labels: torch.Tensor,
                       num_items_in_batch: Optional[torch.Tensor] = None,
                       source: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The causal-LM loss of ``[P ; inputs]`` in every row, from the input positions' logits
    (b, L, V) and the prompts' last logits (k, 1, V): position t < L - 1 predicts ``labels[:, t + 1]``,
    the row's prompt's last position predicts ``labels[:, 0]`` (row i's prompt is ``source[i]``; -1:
    none, so no such term; None: every row the first); -100 is ignored. Both terms are sums divided by
    ``num_items_in_batch``, or else by the number of targets, as the model's ``loss_function`` divides."""
    first_labels = labels[:, :1]
    if source is None:
        first = prompt_logits[:1].expand(labels.shape[0], 1, -1)
    else:
        first = prompt_logits[source.clamp_min(0)]
        first_labels = first_labels.masked_fill((source < 0)[:, None], -100)
    if num_items_in_batch is None:
        num_items_in_batch = (labels[:, 1:] != -100).sum() + (first_labels != -100).sum()
    vocab = logits.shape[-1]
    following = F.pad(labels[:, 1:], (0, 1), value=-100)
    return (loss_function(logits, None, vocab_size=vocab, num_items_in_batch=num_items_in_batch, shift_labels=following)
            + loss_function(first.contiguous(), None, vocab_size=vocab, num_items_in_batch=num_items_in_batch,
                            shift_labels=first_labels.contiguous()))


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]
