"""``FusedDePTEmbedding``: a frozen word embedding plus DePT's soft prompt and low-rank update."""
import math
from typing import Optional

import torch
from torch import nn

from .functional import dept_embedding


class FusedDePTEmbedding(nn.Module):
    """Embedding stage of Decomposed Prompt Tuning (Shi & Lipani, 2024).

    ``forward(input_ids)`` returns ``[P ; E[ids] + scaling * (A @ B)[:L]]`` of shape
    (b, m + L, d): the soft prompt P (``prompt``, m x d) prepended to the frozen word embeddings,
    whose first L positions receive the position-wise update ``scaling * lora_A @ lora_B``
    (``lora_A`` s x r, ``lora_B`` r x d, s = ``max_length``, ``scaling`` = lora_alpha / sqrt(r)).
    ``rank=0`` is vanilla prompt tuning; ``num_prompt_tokens=0`` is the update alone.

    On CUDA (or CPU with ``TRITON_INTERPRET=1``) this runs one fused Triton kernel forward and
    one backward; on a plain CPU it runs the eager reference. Initialisation follows the DePT
    authors: A Kaiming-uniform(a=sqrt(5)), B zeros (so the update starts at 0); the prompt
    starts as rows of E at random token ids ("sampled vocabulary", Lester et al. 2021).
    The wrapped embedding is frozen (``requires_grad=False``) unless the user unfreezes it.

    Args:
        word_embeddings: the model's ``nn.Embedding`` (V x d); its weight is used, not copied.
        num_prompt_tokens: m, the soft prompt length.
        rank: r, rank of the update (0 disables it).
        max_length: s, the longest input the update covers; longer inputs are refused.
        lora_alpha: scaling numerator (scaling = lora_alpha / sqrt(r)); DePT default 8.
        deterministic: bit-reproducible embedding gradient when E is unfrozen (see
            :func:`dept_fast.functional.dept_embedding`); None follows
            ``torch.are_deterministic_algorithms_enabled()``.
    """

    def __init__(self, word_embeddings: nn.Embedding, num_prompt_tokens: int, rank: int, max_length: int,
                 lora_alpha: float = 8.0, deterministic: Optional[bool] = None) -> None:
        super().__init__()
        if not isinstance(word_embeddings, nn.Embedding):
            raise TypeError(f"word_embeddings must be an nn.Embedding, got {type(word_embeddings).__name__}")
        for name, value in (("num_prompt_tokens", num_prompt_tokens), ("rank", rank)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        weight = word_embeddings.weight
        vocab, dim = weight.shape
        factory = {"dtype": weight.dtype, "device": weight.device}

        self.word_embeddings = word_embeddings
        word_embeddings.weight.requires_grad_(False)
        self.num_prompt_tokens = num_prompt_tokens
        self.rank = rank
        self.max_length = max_length
        self.lora_alpha = float(lora_alpha)
        self.scaling = self.lora_alpha / math.sqrt(rank) if rank > 0 else 0.0
        self.deterministic = deterministic

        token_ids = torch.randint(0, vocab, (num_prompt_tokens,), device=weight.device)
        self.prompt = nn.Parameter(weight.detach()[token_ids].clone())
        self.lora_A = nn.Parameter(torch.empty((max_length, rank), **factory))
        self.lora_B = nn.Parameter(torch.zeros((rank, dim), **factory))
        if rank > 0:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

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

    def forward(self, input_ids: torch.Tensor, with_prompt: bool = True) -> torch.Tensor:
        """(b, L) ids, L <= max_length -> (b, m + L, d) embeddings in the word embeddings' dtype;
        ``with_prompt=False`` gives the (b, L, d) tokens alone, ``E[ids] + scaling * (A @ B)[:L]``
        (the same fused kernel with no prompt rows), for callers that feed the prompt another way."""
        prompt = self.prompt if with_prompt else self.prompt[:0]
        return dept_embedding(input_ids, self.word_embeddings.weight, prompt, self.lora_A, self.lora_B,
                              self.scaling, deterministic=self.deterministic,
                              padding_idx=self.word_embeddings.padding_idx)

    def extra_repr(self) -> str:
        return (f"num_prompt_tokens={self.num_prompt_tokens}, rank={self.rank}, "
                f"max_length={self.max_length}, lora_alpha={self.lora_alpha}")

    def save_pretrained(self, path: str) -> None:
        """Save prompt, lora_A, lora_B (safetensors) and the config (json) into directory ``path``;
        the word embeddings are not saved. See :mod:`dept_fast.checkpoint`."""
        from .checkpoint import save_embedding

        save_embedding(self, path)

    @classmethod
    def from_pretrained(cls, path: str, word_embeddings: nn.Embedding,
                        max_length: Optional[int] = None) -> "FusedDePTEmbedding":
        """Load an adapter directory (ours, the DePT authors' PROMPT_TUNING_LORA or PEFT PROMPT_TUNING)
        around ``word_embeddings``; ``max_length`` only for checkpoints that do not record it (PEFT)."""
        from .checkpoint import load_embedding

        return load_embedding(path, word_embeddings, max_length)
