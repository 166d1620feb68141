"""``PromptEmbedder``: DePT and prompt-tuning adapters as vLLM ``prompt_embeds``, any mix per batch.

vLLM (``LLM(..., enable_prompt_embeds=True)``) takes a request as ``{"prompt_embeds": (n, d)}`` and
feeds those rows to the model's first layer as they are (its ``forward`` skips the embedding when
given ``inputs_embeds``); the tokens it generates it embeds itself, with the model's own embedding
(``embed_input_ids``). So request i with tokens ``ids`` (length L) for adapter a is sent as

    prompt_embeds = [P_a ; E[ids] + scaling_a * (A_a @ B_a)[:L]]        (m_a + L, d)

(``"__base__"``: ``E[ids]``, the plain model), and generated tokens get ``E[token]`` alone: the
DePT authors' generation semantics, which dept_fast's HF ``generate`` follows with
``update_generated=False`` (``apply_dept``/``load_dept``). Requests are unpadded, so a token's
update row is its column. ``E[ids]`` is what the model's own input-embedding module computes:
models that scale it (Gemma multiplies by sqrt(hidden) inside its embedding module, and vLLM's
Gemma does so in ``embed_input_ids``, not on ``prompt_embeds``) need the adapters to carry that
scale; an adapter whose stage does not match its model's embedding module is refused.
"""
import dataclasses
import os
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..checkpoint.dept import build_embedding, read_checkpoint
from ..checkpoint.whole_model import MODEL_CONFIG_KEY, find_whole_model
from ..distributed import refuse_zero3
from ..hf.adapters import BASE, DEPT, PREFIX, adapters_of
from ..hf.dept import _check_position_limit, _position_limit
from ..modules.embedding_scale import embedding_scale
from ..modules.dept_embedding import FusedDePTEmbedding, mixed_dept_embedding
from .input_embeddings import load_input_embeddings

PathLike = Union[str, os.PathLike]
TokenIds = Union[torch.Tensor, Sequence[Union[Sequence[int], torch.Tensor]]]


class PromptEmbedder:
    """Builds vLLM prompt dicts from token ids, one adapter (or ``"__base__"``) per request.

    Args:
        embeddings: the model's input-embedding module (``model.get_input_embeddings()``).
        adapters: DePT adapters by name, each a :class:`FusedDePTEmbedding` wrapping ``embeddings``.

    Use :meth:`from_pretrained` (checkpoints on disk, the base model's embedding matrix only) or
    :meth:`from_model` (the adapters attached to an HF model), then :meth:`prompts`.
    """

    def __init__(self, embeddings: nn.Embedding, adapters: Mapping[str, FusedDePTEmbedding]) -> None:
        if not isinstance(embeddings, nn.Embedding):
            raise TypeError(f"embeddings must be an nn.Embedding, got {type(embeddings).__name__}")
        for name, adapter in adapters.items():
            if not isinstance(name, str) or not name or name == BASE:
                raise ValueError(f"adapter names must be non-empty strings other than {BASE!r}; got {name!r}")
            if not isinstance(adapter, FusedDePTEmbedding):
                raise TypeError(f"adapter {name!r} is a {type(adapter).__name__}, not a FusedDePTEmbedding")
            if adapter.word_embeddings is not embeddings:
                raise ValueError(f"adapter {name!r} wraps other word embeddings than the embedder's")
        refuse_zero3(adapters.values(), "dept_fast.vllm.PromptEmbedder")
        self.embeddings = embeddings
        self.adapters: Dict[str, FusedDePTEmbedding] = dict(adapters)
        self._unservable: Dict[str, str] = {}  # name -> why it cannot go through prompt_embeds
        check_embedding_scale(embeddings, self.adapters)

    @classmethod
    def from_pretrained(cls, base_model_dir: PathLike, adapters: Mapping[str, PathLike], *,
                        max_length: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device, None] = None) -> "PromptEmbedder":
        """The adapters saved in ``adapters`` ({name: directory}) around the input embeddings of the
        model saved in ``base_model_dir``, of which only the embedding tensor is read (see
        :func:`load_input_embeddings`).

        Each directory is read in any format ``load_dept`` reads (dept_fast, the DePT authors'
        ``PROMPT_TUNING_LORA``, PEFT ``PROMPT_TUNING``, a whole-model save: there the adapter recorded
        under the name, or the only one recorded). ``max_length`` only for checkpoints that record
        none (PEFT), defaulting, as in ``load_dept``, to the model's position limit minus the prompt.
        ``dtype``: the embedding table's (None: as saved); the adapters keep their saved dtype and the
        prompts come out in the table's. ``device``: where the stage runs (None: CUDA when available,
        where all requests take one launch of the fused kernel; else CPU).
        """
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        embeddings, model = load_input_embeddings(base_model_dir, dtype, device)
        limit = _position_limit(model)
        built = {}
        for name, path in adapters.items():
            checkpoint = read_checkpoint(path, embeddings.embedding_dim, max_length, _saved_adapter_name(path, name))
            config = checkpoint.config
            if config.max_length is None and limit is not None:
                checkpoint.config = config = dataclasses.replace(config, max_length=limit - config.num_prompt_tokens)
            _check_position_limit(model, config.num_prompt_tokens, config.max_length)
            built[name] = build_embedding(checkpoint, embeddings).requires_grad_(False)
        return cls(embeddings, built)

    @classmethod
    def from_model(cls, model: nn.Module) -> "PromptEmbedder":
        """The DePT adapters attached to ``model`` (``apply_dept``/``load_dept``; ``model.dept_adapters``)
        by their names; their tensors are used, not copied, so later changes to the model show."""
        if not hasattr(model, "get_input_embeddings") or not hasattr(model, "config"):
            raise TypeError(f"expected a transformers model (with .config and .get_input_embeddings()), "
                            f"got {type(model).__name__}")
        if model.config.is_encoder_decoder:
            raise ValueError(f"{type(model).__name__} is an encoder-decoder model; vLLM takes prompt_embeds for "
                             "decoder-only models only")
        prefixes = adapters_of(model, PREFIX)
        dept = adapters_of(model, DEPT)
        embeddings = next(iter(dept.values())).word_embeddings if dept else model.get_input_embeddings()
        embedder = cls(embeddings, {name: a for name, a in dept.items() if name not in prefixes})
        for name in prefixes:  # a name with both kinds needs its prefixes too
            embedder._unservable[name] = (
                f"{name!r} names a Prefix-Tuning adapter, whose per-layer keys/values cannot go through vLLM's "
                "prompt_embeds (they carry the first layer's inputs only)")
        return embedder

    @property
    def names(self) -> List[str]:
        """The adapter names :meth:`prompts` takes (besides ``"__base__"``)."""
        return list(self.adapters)

    @torch.no_grad()
    def prompts(self, input_ids: TokenIds, adapter_names: Sequence[str]) -> List[Dict[str, torch.Tensor]]:
        """One vLLM prompt dict ``{"prompt_embeds": (m_a + L_i, d)}`` per request.

        Args:
            input_ids: each request's token ids: a list of int lists or 1-D integer tensors (ragged
                lengths are fine), or a 2-D (requests, L) integer tensor.
            adapter_names: each request's adapter name, or ``"__base__"`` for the plain model.

        Returns:
            CPU tensors in the embedding table's dtype (vLLM sends prompts to its engine from CPU),
            views of one (requests, M + L_max, d) result: the stage runs once for all requests (one
            launch of the fused mixed kernel on CUDA when the longest request fits every requested
            adapter's max_length; otherwise the per-position path).

        Raises ValueError before anything is computed for: a count of names other than of requests,
        an unknown name, a request without tokens, ids outside the vocabulary, a request longer than
        its adapter's max_length.
        """
        requests = _token_lists(input_ids)
        names = self._check_names(adapter_names, len(requests))
        vocab = self.embeddings.num_embeddings
        for i, (ids, name) in enumerate(zip(requests, names)):
            if ids.numel() == 0:
                raise ValueError(f"request {i} has no tokens")
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= vocab:
                raise ValueError(f"request {i}: token ids must lie in [0, {vocab}) (the vocabulary), found "
                                 f"{low if low < 0 else high}")
            if name != BASE and ids.numel() > self.adapters[name].max_length:
                raise ValueError(f"request {i} has {ids.numel()} tokens; adapter {name!r} covers max_length="
                                 f"{self.adapters[name].max_length} positions")
        lengths = [ids.numel() for ids in requests]
        longest, device = max(lengths), self.embeddings.weight.device
        padded = torch.zeros(len(requests), longest, dtype=torch.long)
        for i, ids in enumerate(requests):
            padded[i, :lengths[i]] = ids
        used = list(dict.fromkeys(n for n in names if n != BASE))
        if not used:
            out, slots, prompt_lengths = self.embeddings(padded.to(device)), 0, [0] * len(names)
        else:
            adapters = [self.adapters[n] for n in used]
            index = torch.tensor([used.index(n) if n != BASE else -1 for n in names])
            positions = None  # every token at its column: the fused stage
            if longest > min(a.max_length for a in adapters):  # right padding past some adapter's rows
                positions = torch.arange(longest).expand(len(names), longest)
                positions = positions.masked_fill(positions >= torch.tensor(lengths)[:, None], 0).to(device)
            out = mixed_dept_embedding(adapters, index.to(device), padded.to(device), with_prompt=True,
                                       positions=positions)
            slots = max(a.num_prompt_tokens for a in adapters)
            prompt_lengths = [self.adapters[n].num_prompt_tokens if n != BASE else 0 for n in names]
        out = out.cpu()
        return [{"prompt_embeds": out[i, slots - m:slots + n]} for i, (m, n) in enumerate(zip(prompt_lengths, lengths))]

    def _check_names(self, adapter_names: Sequence[str], count: int) -> List[str]:
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"adapter_names must be a list of adapter names, one per request; got {adapter_names!r}")
        names = list(adapter_names)
        if len(names) != count:
            raise ValueError(f"adapter_names has {len(names)} names for {count} requests (one per request)")
        for name in names:
            if name in self._unservable:
                raise ValueError(self._unservable[name])
        unknown = sorted({n for n in names if n != BASE and n not in self.adapters})
        if unknown:
            raise ValueError(f"unknown adapter name(s) {unknown}; the embedder has {self.names} "
                             f"(and {BASE!r} for the plain model)")
        return names


def check_embedding_scale(embeddings: nn.Embedding, adapters: Mapping[str, FusedDePTEmbedding]) -> None:
    """Refuse adapters whose stage would not give what the model's own embedding module gives.

    vLLM feeds ``prompt_embeds`` to the first layer unchanged, so the token rows must be the model's
    ``embeddings(ids)`` plus the update: each adapter's ``embed_scale`` must be the module's own
    (:func:`~dept_fast.modules.embedding_scale.embedding_scale`; adapters built around the module
    derive it, a scale given by hand may differ)."""
    if not adapters:
        return
    scale = embedding_scale(embeddings)
    for name, adapter in adapters.items():
        if adapter.embed_scale != scale:
            raise ValueError(f"{type(embeddings).__name__} multiplies its rows by {scale:g} in its forward, but adapter "
                             f"{name!r} adds its update to {adapter.embed_scale:g} x E[ids]; vLLM feeds prompt_embeds "
                             "to the layers as they are, so these prompts would be wrong")


def _saved_adapter_name(path: PathLike, name: str) -> str:
    """The adapter to read from a whole-model save at ``path`` for serving name ``name``: that name if
    it was saved, else the only DePT adapter it records (other formats hold one adapter: ``name``)."""
    whole = find_whole_model(os.fspath(path)) if os.path.isdir(path) else None
    records = whole.config.get(MODEL_CONFIG_KEY, {}) if whole is not None else {}
    saved = records.get(DEPT, {}) if isinstance(records, dict) else {}
    if isinstance(saved, dict) and name not in saved and len(saved) == 1:
        return next(iter(saved))
    return name


def _token_lists(input_ids: TokenIds) -> List[torch.Tensor]:
    """Each request's ids as a 1-D int64 CPU tensor (TypeError/ValueError for anything else)."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids as a tensor must be 2-D (requests, L), got shape {tuple(input_ids.shape)}; "
                             "for ragged requests pass a list of 1-D id lists or tensors")
        input_ids = list(input_ids)
    if isinstance(input_ids, (str, bytes)) or not isinstance(input_ids, Sequence) or not input_ids:
        raise TypeError("input_ids must be a non-empty list of token-id lists (one per request) or a 2-D tensor")
    requests = []
    for i, ids in enumerate(input_ids):
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise ValueError(f"request {i}: token ids must be a 1-D integer tensor, got {ids.dtype} "
                                 f"of shape {tuple(ids.shape)}")
            requests.append(ids.detach().to("cpu", torch.long))
        elif isinstance(ids, Sequence) and not isinstance(ids, (str, bytes)) and \
                all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            requests.append(torch.tensor(list(ids), dtype=torch.long))
        else:
            raise TypeError(f"request {i}: token ids must be a list of ints or a 1-D integer tensor, "
                            f"got {type(ids).__name__}")
    return requests
