"""Input validation done in Python before any launch: a clear error, never an out-of-bounds read."""
import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _need(cond: bool, message: str, exc: type = ValueError) -> None:
    if not cond:
        raise exc(message)


def check_dept_inputs(input_ids: torch.Tensor, weight: torch.Tensor, prompt: torch.Tensor,
                      lora_A: torch.Tensor, lora_B: torch.Tensor, check_ids: bool = True) -> None:
    """Validate the DePT stage's inputs; raises TypeError/ValueError naming what is wrong.

    ``check_ids`` compares the ids with [0, V) on the host, which synchronises with the GPU
    once; it is skipped while torch.compile traces (the kernel then emits NaN rows for bad
    ids instead of reading out of bounds).
    """
    _need(isinstance(input_ids, torch.Tensor), f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}",
          TypeError)
    _need(input_ids.dtype in (torch.int32, torch.int64),
          f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}", TypeError)
    _need(input_ids.dim() == 2,
          f"input_ids must be 2-D (batch, length), got shape {tuple(input_ids.shape)}; "
          "for a single sequence pass input_ids.unsqueeze(0)")
    for name, t in (("word embeddings", weight), ("prompt", prompt), ("lora_A", lora_A), ("lora_B", lora_B)):
        _need(t.dtype in _FLOAT_DTYPES, f"{name} must be float32, float16 or bfloat16, got {t.dtype}", TypeError)
        _need(t.dim() == 2, f"{name} must be 2-D, got shape {tuple(t.shape)}")
        _need(t.device == weight.device,
              f"{name} is on {t.device} but the word embeddings are on {weight.device}")
    _need(input_ids.device == weight.device,
          f"input_ids are on {input_ids.device} but the word embeddings are on {weight.device}; "
          f"move them with input_ids.to({str(weight.device)!r})")
    _need(lora_A.dtype == lora_B.dtype,
          f"lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must share a dtype", TypeError)
    vocab, dim = weight.shape
    max_length, rank = lora_A.shape
    _need(prompt.shape[1] == dim, f"prompt has width {prompt.shape[1]}, the word embeddings {dim}")
    _need(tuple(lora_B.shape) == (rank, dim),
          f"lora_B must have shape (rank, d) = ({rank}, {dim}), got {tuple(lora_B.shape)}")
    seq_len = input_ids.shape[1]
    _need(seq_len <= max_length,
          f"input length {seq_len} exceeds max_length {max_length} of the low-rank update; "
          "truncate the inputs or build the adapter with a larger max_length")
    if check_ids and input_ids.numel() and not torch.compiler.is_compiling():
        low, high = (int(v) for v in torch.aminmax(input_ids))
        _need(low >= 0 and high < vocab,
              f"input_ids must lie in [0, {vocab}) (the vocabulary size); found values in [{low}, {high}]")
