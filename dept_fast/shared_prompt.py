"""The shared soft prompt: in a causal decoder, DePT's prompt runs once and every row attends to it.

Why it is exact. The m prompt positions come first and, under causal attention, attend only to
each other, so their hidden states, and so every layer's keys and values for them, are the same in
every row of a batch whatever the row's input or padding. One batch-1 pass of the prompt
(positions 0..m-1) captures each layer's (key, value); the b x L input tokens then run at
positions m, m+1, ... with those K/V joined before their own (expanded to the batch: a view)
through the prefix attention function of :mod:`dept_fast.prefix_attention`, the route
Prefix-Tuning uses and gradient checkpointing replays. Autograd sums every row's gradient into the
one prompt pass. With dropout active (training), the prompt's activations draw one dropout mask
for the whole batch instead of one per row; in eval mode, or without dropout, the numbers are
those of the prompt in every row.

The loss. With the prompt in every row, the last prompt position predicts the first input token.
The prompt pass computes that logit once (1 x V) and :meth:`SharedPrompt.add_prompt_loss` adds its
term to the input positions' terms, reduced as the model's own loss reduces (sum over targets /
their count, or ``num_items_in_batch`` when given): the prompt-in-every-row loss. The returned
logits (and hidden states, attentions) cover the L input positions only; a (b, m + L, V) tensor is
never built.

Inference. In eval mode without gradient recording the prompt pass runs once and its K/V and logit
are kept until a parameter of the model (the prompt or a base weight) changes in place (as an
optimizer step or ``load_state_dict`` does: its version counter moves) or is replaced (as ``.to()``
does), or the model moves to another dtype or device.
"""
import inspect
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .embedding import FusedDePTEmbedding
from .prefix_attention import (KeyValue, PrefixAttentionSetup, begin_pass, checkpointed_modules,
                               prefix_forward_kwargs)


class PromptStates(NamedTuple):
    """What one batch-1 pass of the prompt leaves for the input pass."""

    key_values: List[KeyValue]
    """Per layer slot, the prompt's (key, value), each (1, kv_heads, m, head_dim)."""
    logits: torch.Tensor
    """(1, 1, V): the last prompt position's logits, which predict the first input token."""


class SharedPrompt:
    """A DePT adapter's prompt, run once per batch (or once per adapter state, in inference).

    Owned by the decoder-only forward hooks of :mod:`dept_fast.hf_dept`: the pre-hook calls
    :meth:`input_kwargs` to turn the caller's kwargs (``inputs_embeds`` already holding the tokens
    without the prompt) into those of the input pass; :meth:`add_prompt_loss`, a forward hook,
    completes the loss.
    """

    def __init__(self, adapter: FusedDePTEmbedding, model: nn.Module, setup: PrefixAttentionSetup) -> None:
        self.adapter = adapter
        self.inner = setup.inner
        self.num_layers = setup.layouts["decoder"][0]
        self.checkpointed = checkpointed_modules(model)
        self.takes_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._cached: Optional[Tuple[Tuple[Any, ...], torch.Tensor, PromptStates]] = None
        self._pending: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (labels, prompt logits)

    def states(self, model: nn.Module) -> PromptStates:
        """The prompt's K/V and last logit: computed now (training, or gradients recorded), or the
        cached pass while no parameter of the model changed and its dtype/device did not (inference)."""
        if model.training or torch.is_grad_enabled():
            return self._prompt_pass(model)
        prompt, anchor = self.adapter.prompt, next(model.parameters())
        key = (anchor.dtype, anchor.device) + tuple((p.data_ptr(), p._version) for p in model.parameters())
        if self._cached is None or self._cached[0] != key:
            # Holding the prompt's storage keeps a new prompt from reusing its address.
            self._cached = (key, prompt.detach(), self._prompt_pass(model))
        return self._cached[2]

    def _prompt_pass(self, model: nn.Module) -> PromptStates:
        """Run the prompt alone (batch 1, positions 0..m-1) through ``model.forward`` (not
        ``model(...)``, whose DePT pre-hook is for token ids) and capture every layer's K/V."""
        captured: Dict[int, KeyValue] = {}
        prompt = self.adapter.prompt.to(self.adapter.weight.dtype)[None]
        kwargs = prefix_forward_kwargs({"inputs_embeds": prompt, "use_cache": False}, capture=captured,
                                       inner=self.inner)
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
        for :meth:`add_prompt_loss`."""
        begin_pass(model, self.inner, self.checkpointed)
        states = self.states(model)
        labels = kwargs.get("labels")
        self._pending = None if labels is None else (labels, states.logits)
        kwargs["labels"] = None
        return prefix_forward_kwargs(kwargs, states.key_values, inner=self.inner, shift_positions=shift_positions)

    def add_prompt_loss(self, model: nn.Module, args: tuple, kwargs: Dict[str, Any], output: Any) -> Any:
        """Forward hook (``with_kwargs=True``): the loss over the input positions plus the first input
        token's term from the prompt's last logit, put first in the output as the model would."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        labels, prompt_logits = pending
        logits = _logits(output)
        if tuple(labels.shape) != tuple(logits.shape[:2]):
            raise ValueError(f"labels have shape {tuple(labels.shape)} but the logits cover {tuple(logits.shape[:2])} "
                             "(batch, input positions); with a shared prompt, labels are the inputs' alone")
        loss = shared_prompt_loss(model.loss_function, logits, prompt_logits, labels, kwargs.get("num_items_in_batch"))
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
