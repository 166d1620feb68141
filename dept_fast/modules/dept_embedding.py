"""``FusedDePTEmbedding``: a frozen word embedding plus DePT's soft prompt and low-rank update."""
import math
from typing import Optional, Sequence

import torch
from torch import nn

from ..distributed import gathered, refuse_sharded
from ..ops import dept_embedding, dept_embedding_at_positions, dept_embedding_mixed
from ..ops.checks import FLOAT_DTYPES, ID_CHECKS, check_embed_scale
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

    Args:
        word_embeddings: the model's ``nn.Embedding`` (V x d); its weight is used, not copied.
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
            adapter: it is not saved.
    """

    def __init__(self, word_embeddings: nn.Embedding, num_prompt_tokens: int, rank: int, max_length: int,
                 lora_alpha: float = 8.0, deterministic: Optional[bool] = None, id_check: str = "host",
                 embed_scale: Optional[float] = None) -> None:
        super().__init__()
        if not isinstance(word_embeddings, nn.Embedding):
            raise TypeError(f"word_embeddings must be an nn.Embedding, got {type(word_embeddings).__name__}")
        check_config(num_prompt_tokens, rank, max_length, lora_alpha)
        if id_check not in ID_CHECKS:
            raise ValueError(f"id_check must be one of {ID_CHECKS}, got {id_check!r}")
        refuse_sharded(word_embeddings)
        weight = word_embeddings.weight
        if weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"word embeddings must be float32, float16 or bfloat16, got {weight.dtype}")
        with gathered([weight]):  # a model built under deepspeed.zero.Init holds a (0,) placeholder
            if weight.dim() != 2:
                raise ValueError(f"word embeddings must be 2-D (vocab, d), got shape {tuple(weight.shape)}")
            vocab, dim = weight.shape
            token_ids = torch.randint(0, vocab, (num_prompt_tokens,), device=weight.device)
            rows = weight.detach()[token_ids].clone()
        embed_scale = check_embed_scale(embedding_scale(word_embeddings) if embed_scale is None else embed_scale)
        # What the model's embedding gives for these ids: c * E[ids], in fp32, rounded to E's dtype.
        prompt = (rows.float() * embed_scale).to(weight.dtype)
        factory = {"dtype": weight.dtype, "device": weight.device}

        self.word_embeddings = word_embeddings
        word_embeddings.weight.requires_grad_(False)
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
        return self.word_embeddings.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.word_embeddings.embedding_dim

    def forward(self, input_ids: torch.Tensor, with_prompt: bool = True,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(b, L) ids, L <= max_length -> (b, m + L, d) embeddings in the word embeddings' dtype.

        ``with_prompt=False`` gives the (b, L, d) tokens alone, ``c * E[ids] + scaling * (A @ B)[:L]``
        (the same fused kernel with no prompt rows), for callers that feed the prompt another way.
        ``positions`` (b, L): each token takes update row ``positions[i, t]`` instead of its column
        (:func:`dept_fast.ops.dept_embedding_at_positions`, a PyTorch path); None: the fused stage.
        """
        prompt = self.prompt if with_prompt else self.prompt[:0]
        weight, padding_idx = self.word_embeddings.weight, self.word_embeddings.padding_idx
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
                         f"multiplier), got {sorted({a.embed_scale for a in adapters})}")
    prompts = [a.prompt if with_prompt else a.prompt[:0] for a in adapters]
    return dept_embedding_mixed(input_ids, adapter_index, first.weight, prompts, [a.lora_A for a in adapters],
                                [a.lora_B for a in adapters], [a.scaling for a in adapters], positions=positions,
                                id_check=first.id_check, padding_idx=first.word_embeddings.padding_idx,
                                deterministic=first.deterministic, embed_scale=first.embed_scale)

