"""``FusedDePTEmbedding``: a frozen word embedding plus DePT's soft prompt and low-rank update."""
import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..distributed import gathered, refuse_sharded
from ..ops import dept_embedding, dept_embedding_at_positions, dept_embedding_mixed
from ..ops.checks import FLOAT_DTYPES, ID_CHECKS, check_embed_scale, check_in_range
from .embedding_scale import embedding_scale


class FusedDePTEmbedding(nn.Module):
    """Embedding stage of Decomposed Prompt Tuning (Shi & Lipani, 2024).

    ``forward(input_ids)`` returns ``[P ; c * E[ids] + scaling * (A @ B)[:L]]`` of shape
    (b, m + L, d): the soft prompt P (``prompt``, m x d) prepended to the frozen word embeddings
    as the model's embedding module gives them (c = ``embed_scale``), whose first L positions receive
    the position-wise update ``scaling * lora_A @ lora_B`` (``lora_A`` s x r, ``lora_B`` r x d,
    s = ``max_length``, ``scaling`` = lora_alpha / sqrt(r)).
    ``rank=0`` is vanilla prompt tuning; ``num_prompt_tokens=0`` is the update alone.

    On CUDA (or CPU with ``TRITON_INTERPRET=1``) this runs one fused Triton kernel forward and
    one backward; on a plain CPU it runs the eager reference. Initialisation follows the DePT
    authors: A Kaiming-uniform(a=sqrt(5)), B zeros (so the update starts at 0); the prompt
    starts as what the model's embedding gives for random token ids, ``c * E[ids]`` rounded to E's
    dtype ("sampled vocabulary", Lester et al. 2021).
    The wrapped embedding is frozen (``requires_grad=False``) unless the user unfreezes it.

    An embedding module with parameters of its own besides its weight (a LoRA-wrapped embedding,
    :func:`computes_own_rows`) is run as it is and the update added to what it returns, in PyTorch:
    ``[P ; module(ids) + scaling * (A @ B)[:L]]`` (``embed_scale`` is then None); its parameters get
    their gradients through it.

    Args:
        word_embeddings: the model's input-embedding module (an ``nn.Embedding``, a subclass, or a
            wrapper of one), with its (V x d) ``weight``; used, not copied.
        num_prompt_tokens: m, the soft prompt length.
        rank: r, rank of the update (0 disables it).
        max_length: s, the longest input the update covers; longer inputs are refused.
        lora_alpha: scaling numerator (scaling = lora_alpha / sqrt(r)); DePT default 8.
        deterministic: bit-reproducible embedding gradient when E is unfrozen (see
            :func:`dept_fast.ops.dept_embedding`); None follows
            ``torch.are_deterministic_algorithms_enabled()``.
        id_check: how token ids outside the vocabulary are caught: ``"host"`` (a ValueError; one
            host synchronisation per call) or ``"device"`` (an asynchronous device-side assertion:
            no synchronisation, so a training step can be captured in a CUDA graph). The kernel
            never reads a bad id either way.
        embed_scale: c, the float the model's embedding module multiplies E's rows by inside its own
            forward (an ``nn.Embedding`` subclass: sqrt(d) for Gemma, BART with ``scale_embedding``;
            1 for a plain ``nn.Embedding``). None (the default): derived by running the module
            (:func:`dept_fast.modules.embedding_scale.embedding_scale`, which refuses a module whose
            output is not one scale of its weight's rows). A property of the base model, not of the
            adapter: it is not saved. Ignored for a module that computes its own rows.
    """

    def __init__(self, word_embeddings: nn.Module, num_prompt_tokens: int, rank: int, max_length: int,
                 lora_alpha: float = 8.0, deterministic: Optional[bool] = None, id_check: str = "host",
                 embed_scale: Optional[float] = None) -> None:
        super().__init__()
        weight = getattr(word_embeddings, "weight", None)
        if not isinstance(word_embeddings, nn.Module) or not isinstance(weight, torch.Tensor):
            raise TypeError(f"word_embeddings must be an embedding module with a weight (e.g. an nn.Embedding), got "
                            f"{type(word_embeddings).__name__}")
        check_config(num_prompt_tokens, rank, max_length, lora_alpha)
        if id_check not in ID_CHECKS:
            raise ValueError(f"id_check must be one of {ID_CHECKS}, got {id_check!r}")
        refuse_sharded(word_embeddings)
        if weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"word embeddings must be float32, float16 or bfloat16, got {weight.dtype}")
        own_rows = computes_own_rows(word_embeddings)
        with gathered([weight]):  # a model built under deepspeed.zero.Init holds a (0,) placeholder
            if weight.dim() != 2:
                raise ValueError(f"word embeddings must be 2-D (vocab, d), got shape {tuple(weight.shape)}")
            vocab, dim = weight.shape
            token_ids = torch.randint(0, vocab, (num_prompt_tokens,), device=weight.device)
            rows = weight.detach()[token_ids].clone()
        if own_rows:  # what the module computes, parameters of its own included
            embed_scale = None
            prompt = _module_rows(word_embeddings, token_ids, dim)
        else:
            embed_scale = check_embed_scale(embedding_scale(word_embeddings) if embed_scale is None else embed_scale)
            # What the model's embedding gives for these ids: c * E[ids], in fp32, rounded to E's dtype.
            prompt = (rows.float() * embed_scale).to(weight.dtype)
        factory = {"dtype": weight.dtype, "device": weight.device}

        self.word_embeddings = word_embeddings
        weight.requires_grad_(False)
        self.num_prompt_tokens = num_prompt_tokens
        self.rank = rank
        self.max_length = max_length
        self.lora_alpha = float(lora_alpha)
        self.scaling = self.lora_alpha / math.sqrt(rank) if rank > 0 else 0.0
        self.deterministic = deterministic
        self.id_check = id_check
        self.embed_scale = embed_scale

        self.prompt = nn.Parameter(prompt)
        lora_A = torch.empty((max_length, rank), **factory)
        lora_B = torch.zeros((rank, dim), **factory)
        if rank > 0:
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
            self.lora_A, self.lora_B = nn.Parameter(lora_A), nn.Parameter(lora_B)
        else:  # empty: buffers (saved like parameters), as DeepSpeed ZeRO-3 cannot gather an empty parameter
            self.register_buffer("lora_A", lora_A)
            self.register_buffer("lora_B", lora_B)

    @property
    def weight(self) -> nn.Parameter:
        """The wrapped word-embedding matrix (so code that reads ``embedding.weight`` keeps working)."""
        return self.word_embeddings.weight

    @property
    def num_embeddings(self) -> int:
        return table_size(self.word_embeddings)[0]

    @property
    def embedding_dim(self) -> int:
        return table_size(self.word_embeddings)[1]

    @property
    def padding_idx(self) -> Optional[int]:
        return getattr(self.word_embeddings, "padding_idx", None)

    def forward(self, input_ids: torch.Tensor, with_prompt: bool = True,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(b, L) ids, L <= max_length -> (b, m + L, d) embeddings in the word embeddings' dtype.

        ``with_prompt=False`` gives the (b, L, d) tokens alone, ``c * E[ids] + scaling * (A @ B)[:L]``
        (the same fused kernel with no prompt rows), for callers that feed the prompt another way.
        ``positions`` (b, L): each token takes update row ``positions[i, t]`` instead of its column
        (:func:`dept_fast.ops.dept_embedding_at_positions`, a PyTorch path); None: the fused stage.
        """
        prompt = self.prompt if with_prompt else self.prompt[:0]
        weight, padding_idx = self.word_embeddings.weight, self.padding_idx
        if self.embed_scale is None:  # the module's own rows, then the update (PyTorch)
            check_in_range("input_ids", input_ids, weight.shape[0], "the vocabulary size", self.id_check)
            return dept_embedding_mixed(input_ids, None, weight, [prompt], [self.lora_A], [self.lora_B], [self.scaling],
                                        positions=positions, id_check=self.id_check,
                                        embeds=self.word_embeddings(input_ids))
        if positions is not None:
            return dept_embedding_at_positions(input_ids, positions, weight, prompt, self.lora_A, self.lora_B,
                                               self.scaling, id_check=self.id_check, padding_idx=padding_idx,
                                               embed_scale=self.embed_scale)
        return dept_embedding(input_ids, weight, prompt, self.lora_A, self.lora_B, self.scaling,
                              deterministic=self.deterministic, id_check=self.id_check, padding_idx=padding_idx,
                              embed_scale=self.embed_scale)

    def extra_repr(self) -> str:
        return (f"num_prompt_tokens={self.num_prompt_tokens}, rank={self.rank}, "
                f"max_length={self.max_length}, lora_alpha={self.lora_alpha}, embed_scale={self.embed_scale}")

    def save_pretrained(self, path: str) -> None:
        """Save prompt, lora_A, lora_B (safetensors) and the config (json) into directory ``path``;
        the word embeddings are not saved. See :mod:`dept_fast.checkpoint`."""
        from ..checkpoint.dept import save_embedding

        save_embedding(self, path)

    @classmethod
    def from_pretrained(cls, path: str, word_embeddings: nn.Embedding, max_length: Optional[int] = None, *,
                        embed_scale: Optional[float] = None) -> "FusedDePTEmbedding":
        """Load an adapter directory (ours, the DePT authors' PROMPT_TUNING_LORA or PEFT PROMPT_TUNING)
        around ``word_embeddings``; ``max_length`` only for checkpoints that do not record it (PEFT);
        ``embed_scale`` as in the constructor (checkpoints do not record it: it belongs to the model)."""
        from ..checkpoint.dept import load_embedding

        return load_embedding(path, word_embeddings, max_length, embed_scale=embed_scale)


def _module_rows(word_embeddings: nn.Module, token_ids: torch.Tensor, dim: int) -> torch.Tensor:
    """What the embedding module returns for ``token_ids`` (m,): (m, d); TypeError if it is no embedding."""
    try:
        with torch.no_grad():
            rows = word_embeddings(token_ids[None])
    except (RuntimeError, TypeError, ValueError) as error:
        raise TypeError(f"{type(word_embeddings).__name__} does not take token ids: {error}") from error
    if not isinstance(rows, torch.Tensor) or tuple(rows.shape) != (1, token_ids.shape[0], dim):
        raise TypeError(f"{type(word_embeddings).__name__} returned {getattr(rows, 'shape', type(rows))} for ids "
                        f"(1, {token_ids.shape[0]}), not embeddings (1, {token_ids.shape[0]}, {dim})")
    return rows[0].detach().clone()


def table_size(word_embeddings: nn.Module) -> Tuple[int, int]:
    """(V, d) of an embedding module: its ``num_embeddings`` / ``embedding_dim`` (an ``nn.Embedding``,
    or the base layer a wrapper such as PEFT's LoRA embedding holds), read without its weight's values
    (a ZeRO-3 weight is a placeholder outside its gathering), else its weight's shape."""
    for module in (word_embeddings, getattr(word_embeddings, "get_base_layer", lambda: None)()):
        if module is not None and hasattr(module, "num_embeddings") and hasattr(module, "embedding_dim"):
            return module.num_embeddings, module.embedding_dim
    return tuple(word_embeddings.weight.shape)


def computes_own_rows(word_embeddings: nn.Module) -> bool:
    """Whether the embedding module's output may depend on parameters other than its weight (e.g. a
    LoRA-wrapped embedding): then DePT adds its update to what the module returns, instead of building
    ``c * E[ids]`` in its fused kernel."""
    weight = word_embeddings.weight
    return any(p is not weight for p in word_embeddings.parameters())


def check_config(num_prompt_tokens: int, rank: int, max_length: int, lora_alpha: float) -> None:
    """Raise ValueError naming the first of a DePT adapter's sizes that is not valid."""
    for name, value, low in (("num_prompt_tokens", num_prompt_tokens, 0), ("rank", rank, 0),
                             ("max_length", max_length, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")


def mixed_dept_embedding(adapters: Sequence[FusedDePTEmbedding], adapter_index: torch.Tensor,
                         input_ids: torch.Tensor, with_prompt: bool = True,
                         positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The DePT stage of a mixed-task batch: row i takes ``adapters[adapter_index[i]]`` (-1: none),
    ``[0 ; P_a ; c * E[ids] + scaling_a * (A_a @ B_a)[pos]]`` with each prompt left-padded by zero rows to
    the longest (see :func:`dept_fast.ops.dept_embedding_mixed`). The adapters must wrap one
    embedding table with one ``embed_scale`` c; the first one's ``id_check`` and ``deterministic`` apply."""
    first = adapters[0]
    if any(a.word_embeddings is not first.word_embeddings for a in adapters):
        raise ValueError("the adapters of a mixed batch must wrap the same word embeddings")
    if any(a.embed_scale != first.embed_scale for a in adapters):
        raise ValueError(f"the adapters of a mixed batch must share one embed_scale (the model's embedding "
                         f"multiplier), got {sorted({a.embed_scale for a in adapters}, key=lambda c: (c is None, c or 0.0))}")
    prompts = [a.prompt if with_prompt else a.prompt[:0] for a in adapters]
    embeds = None
    if first.embed_scale is None:
        check_in_range("input_ids", input_ids, first.num_embeddings, "the vocabulary size", first.id_check)
        embeds = first.word_embeddings(input_ids)
    return dept_embedding_mixed(input_ids, adapter_index, first.weight, prompts, [a.lora_A for a in adapters],
                                [a.lora_B for a in adapters], [a.scaling for a in adapters], positions=positions,
                                id_check=first.id_check, padding_idx=first.padding_idx,
                                deterministic=first.deterministic, embed_scale=first.embed_scale or 1.0,
                                embeds=embeds)

