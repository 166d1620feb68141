"""``prompt_embeds`` for vLLM's OpenAI-compatible Completions API (``vllm serve --enable-prompt-embeds``).

The server reads the request's ``"prompt_embeds"`` (one string or a list of them, one completion
each) as base64 text of a ``torch.save``d tensor: vLLM 0.32's ``renderers/embed_utils.py``
(``safe_load_prompt_embeds``) decodes it with ``pybase64.b64decode(validate=True)`` (standard
alphabet, padded), loads it with ``torch.load(weights_only=True, map_location="cpu")``, requires
(tokens, hidden) and casts a floating dtype to the model's.
"""
import base64
import io

import torch


def encode_prompt_embeds(prompt_embeds: torch.Tensor) -> str:
    """``prompt_embeds`` (tokens, hidden) as the Completions API's ``"prompt_embeds"`` string.

    The tensor is copied into storage of its own first: ``torch.save`` of a view writes the whole
    storage it views (for :meth:`PromptEmbedder.prompts` results, every request's rows).
    """
    if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.dim() != 2 or \
            not prompt_embeds.is_floating_point():
        found = tuple(prompt_embeds.shape) if isinstance(prompt_embeds, torch.Tensor) else type(prompt_embeds).__name__
        raise ValueError(f"prompt_embeds must be a 2-D (tokens, hidden) floating-point tensor, got {found}")
    buffer = io.BytesIO()
    torch.save(prompt_embeds.detach().to("cpu", copy=True).contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
