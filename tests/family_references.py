"""References built from the plain model alone, without dept_fast, for the family matrix.

DePT: the plain model fed ``inputs_embeds = [P ; emb(ids) + scaling * (A @ B)[pos]]``, ``emb`` the
model's OWN embedding module (whatever it computes: Gemma's and BART's scale included), the mask
with m ones before it, decoder labels with m x -100 before them. Prefix-Tuning: the plain model with
a ``DynamicCache`` pre-filled with the prefixes (PEFT's route: the tokens at positions p + i), the
mask with p ones before it. Greedy decoding: the whole sequence re-run through these at every step.
"""
import inspect
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from transformers import DynamicCache

KeyValue = Tuple[torch.Tensor, torch.Tensor]


def cache_kwargs(model: nn.Module, cache) -> Dict[str, object]:
    """The generation cache as the model's forward names it (``cache`` from transformers 5.24)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def dept_embeds(model: nn.Module, ids: torch.Tensor, prompt: torch.Tensor, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``[P ; emb(ids) + scaling * (A @ B)[:L]]`` per row, every token at its column."""
    embeds = model.get_input_embeddings()(ids)
    if lora_A.shape[1]:
        embeds = embeds + scaling * (lora_A[:ids.shape[1]] @ lora_B)
    return torch.cat([prompt.expand(ids.shape[0], -1, -1), embeds], 1)


def dept_forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, tensors: Sequence[torch.Tensor],
                 scaling: float, labels: Optional[torch.Tensor] = None, **kwargs):
    """The plain model on DePT's inputs (``tensors`` = prompt, lora_A, lora_B)."""
    m = tensors[0].shape[0]
    ones = torch.ones(ids.shape[0], m, dtype=mask.dtype)
    if labels is not None and not model.config.is_encoder_decoder:
        labels = torch.cat([torch.full((ids.shape[0], m), -100), labels], 1)
    return model(inputs_embeds=dept_embeds(model, ids, *tensors, scaling), attention_mask=torch.cat([ones, mask], 1),
                 labels=labels, **kwargs)


def prefix_cache(key_values: List[KeyValue], config) -> DynamicCache:
    """A cache holding layer i's prefix (key, value), each (b, kv_heads, p, head_dim)."""
    cache = DynamicCache(config=config)
    for layer, (key, value) in enumerate(key_values):
        cache.update(key, value, layer)
    return cache


def prefix_forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, key_values: List[KeyValue],
                   labels: Optional[torch.Tensor] = None):
    """The plain decoder with the prefixes in a pre-filled cache (PEFT's Prefix-Tuning)."""
    batch, p = ids.shape[0], key_values[0][0].shape[2]
    expanded = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in key_values]
    ones = torch.ones(batch, p, dtype=mask.dtype)
    return model(input_ids=ids, attention_mask=torch.cat([ones, mask], 1), labels=labels,
                 **cache_kwargs(model, prefix_cache(expanded, model.config)))


def greedy(step, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding of a decoder by full recomputation: ``step(seq)`` -> logits of the last position."""
    seq = ids
    for _ in range(steps):
        seq = torch.cat([seq, step(seq).argmax(-1, keepdim=True)], 1)
    return seq[:, ids.shape[1]:]
