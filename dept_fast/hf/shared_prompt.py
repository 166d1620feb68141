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
every row.

The loss. With the prompt in every row, the last prompt position predicts the first input token.
The prompt pass computes that logit once (1 x V) and :meth:`SharedPrompt.add_prompt_loss` adds its
term to the input positions' terms, reduced as the model's own loss reduces (sum over targets /
their count, or ``num_items_in_batch`` when given): the prompt-in-every-row loss. The returned
logits (and hidden states, attentions) cover the L input positions only; a (b, m + L, V) tensor is
never built. The labels and the prompt's logit travel from the pre-hook to the forward hook inside
the call's own ``dept_prefix`` kwarg, so concurrent calls on one model never see each other's.

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
from typing import Any, Dict, Iterator, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.dept_embedding import FusedDePTEmbedding
from .attach import prefix_pass
from .attention import PREFIX_KWARG, KeyValue
from .positions import generation_cache
from .route import PrefixRoute

SERVING_ATTR = "_dept_fast_serving"
CACHE_ATTR = "_dept_fast_prompt_states"


class PromptStates(NamedTuple):
    """What one batch-1 pass of the prompt leaves for the input pass."""

    key_values: List[KeyValue]
    """Per layer slot, the prompt's (key, value), each (1, kv_heads, m, head_dim)."""
    logits: torch.Tensor
    """(1, 1, V): the last prompt position's logits, which predict the first input token."""


class PendingLoss(NamedTuple):
    """The input pass's labels and the prompt's last logit, from the pre-hook to the forward hook."""

    labels: torch.Tensor
    prompt_logits: torch.Tensor


class _Serving:
    """The prompt passes computed inside one :func:`serving` context (one per adapter), under a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.states: Dict["SharedPrompt", PromptStates] = {}


@contextmanager
def serving(model: nn.Module) -> Iterator[nn.Module]:
    """Reuse each shared prompt's pass across calls while the context is open (inference servers).

    Inside, the caller promises that no weight of ``model`` changes. The first call without
    gradients (eval mode, ``torch.no_grad()``/``inference_mode()``, or ``generate()``) runs the
    prompt pass; every later such call, from any thread, reuses it, so a request costs only its own
    tokens attending to the prompt. Calls with gradients or in train mode compute their own pass.
    Closing the context drops the kept passes. Without the context, each call (or each
    ``generate()``) runs the prompt pass once.
    """
    if model.__dict__.get(SERVING_ATTR) is not None:
        raise RuntimeError(f"dept_fast.serving is already open on this {type(model).__name__}")
    model.__dict__[SERVING_ATTR] = _Serving()
    try:
        yield model
    finally:
        model.__dict__.pop(SERVING_ATTR, None)


class SharedPrompt:
    """A DePT adapter's prompt, run once per call (see the module docstring for the reuse scopes).

    Owned by the decoder-only forward hooks of :mod:`dept_fast.hf.dept`: the pre-hook calls
    :meth:`input_kwargs` to turn the caller's kwargs (``inputs_embeds`` already holding the tokens
    without the prompt) into those of the input pass; :meth:`add_prompt_loss`, a forward hook,
    completes the loss. Holds configuration only, nothing of any one call.
    """

    def __init__(self, adapter: FusedDePTEmbedding, model: nn.Module, route: PrefixRoute) -> None:
        self.adapter = adapter
        self.route = route
        self.num_layers = route.layouts["decoder"][0]
        self.takes_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    def states(self, model: nn.Module, kwargs: Dict[str, Any]) -> PromptStates:
        """This call's prompt pass: computed now, or reused from the call's generation cache or an
        open :func:`serving` context when no gradient is recorded."""
        if torch.is_grad_enabled():
            return self._prompt_pass(model)
        serving_scope = model.__dict__.get(SERVING_ATTR)
        if serving_scope is not None and not model.training:
            with serving_scope.lock:
                if self not in serving_scope.states:
                    serving_scope.states[self] = self._prompt_pass(model)
                return serving_scope.states[self]
        cache = generation_cache(kwargs)
        if cache is None:
            return self._prompt_pass(model)
        kept = cache.__dict__.setdefault(CACHE_ATTR, {})
        if self not in kept:
            kept[self] = self._prompt_pass(model)
        return kept[self]

    def _prompt_pass(self, model: nn.Module) -> PromptStates:
        """Run the prompt alone (batch 1, positions 0..m-1) through ``model.forward`` (not
        ``model(...)``, whose DePT pre-hook is for token ids) and capture every layer's K/V."""
        captured: Dict[int, KeyValue] = {}
        prompt = self.adapter.prompt.to(self.adapter.weight.dtype)[None]
        kwargs = prefix_pass({"inputs_embeds": prompt, "use_cache": False}, capture=captured)
        if self.takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        output = model.forward(**kwargs)
        missing = set(range(self.num_layers)) - set(captured)
        if missing:
            raise RuntimeError(f"the prompt pass did not reach the attention of layer slot(s) {sorted(missing)}")
        return PromptStates([captured[slot] for slot in range(self.num_layers)], _logits(output)[:, -1:])

    def input_kwargs(self, model: nn.Module, kwargs: Dict[str, Any], shift_positions: bool) -> Dict[str, Any]:
        """The input pass's kwargs: the prompt's K/V as the prefix, ``position_ids`` after it, the
        caller's mask as it is (the prefix attention adds the prompt's columns), labels held back
        (in the call's kwarg) for :meth:`add_prompt_loss`."""
        self.route.begin_pass(model)
        states = self.states(model, kwargs)
        labels = kwargs.get("labels")
        pending = None if labels is None else PendingLoss(labels, states.logits)
        kwargs["labels"] = None
        return prefix_pass(kwargs, states.key_values, shift_positions=shift_positions, state=pending)

    def add_prompt_loss(self, model: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any) -> Any:
        """Forward hook (``with_kwargs=True``): the loss over the input positions plus the first input
        token's term from the prompt's last logit, put first in the output as the model would."""
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
                                  kwargs.get("num_items_in_batch"))
        if isinstance(output, tuple):
            return (loss,) + output
        return type(output)(**{"loss": loss, **{name: value for name, value in output.items() if name != "loss"}})


def shared_prompt_loss(loss_function, logits: torch.Tensor, prompt_logits: torch.Tensor, labels: torch.Tensor,
                       num_items_in_batch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The causal-LM loss of ``[P ; inputs]`` in every row, from the input positions' logits
    (b, L, V) and the prompt's last logit (1, 1, V): position t < L - 1 predicts ``labels[:, t + 1]``,
    the prompt's last position predicts ``labels[:, 0]``; -100 is ignored. Both terms are sums
    divided by ``num_items_in_batch``, or else by the number of targets, as the model's
    ``loss_function`` divides."""
    if num_items_in_batch is None:
        num_items_in_batch = (labels != -100).sum()
    vocab = logits.shape[-1]
    following = F.pad(labels[:, 1:], (0, 1), value=-100)
    first = prompt_logits.expand(labels.shape[0], 1, vocab).contiguous()
    return (loss_function(logits, None, vocab_size=vocab, num_items_in_batch=num_items_in_batch, shift_labels=following)
            + loss_function(first, None, vocab_size=vocab, num_items_in_batch=num_items_in_batch,
                            shift_labels=labels[:, :1].contiguous()))


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]
