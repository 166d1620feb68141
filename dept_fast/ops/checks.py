"""Input validation done in Python before any launch: a clear error, never an out-of-bounds read."""
import math
import numbers
from typing import Optional, Union

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ID_CHECKS = ("host", "device")


def need(cond: bool, message: str, exc: type = ValueError) -> None:
    """Raise ``exc(message)`` unless ``cond``."""
    if not cond:
        raise exc(message)


def check_float_tensor(name: str, tensor: torch.Tensor, dims: Optional[int] = None) -> None:
    """``tensor`` is a float32/float16/bfloat16 tensor (with ``dims`` dimensions, if given)."""
    need(isinstance(tensor, torch.Tensor), f"{name} must be a torch.Tensor, got {type(tensor).__name__}", TypeError)
    need(tensor.dtype in FLOAT_DTYPES,
         f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}", TypeError)
    if dims is not None:
        need(tensor.dim() == dims, f"{name} must be {dims}-D, got shape {tuple(tensor.shape)}")


def check_token_ids(input_ids: torch.Tensor) -> None:
    """``input_ids`` is a 2-D int32/int64 tensor (1-D ids are refused, not guessed)."""
    need(isinstance(input_ids, torch.Tensor), f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}",
         TypeError)
    need(input_ids.dtype in (torch.int32, torch.int64),
         f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}", TypeError)
    need(input_ids.dim() == 2,
         f"input_ids must be 2-D (batch, length), got shape {tuple(input_ids.shape)}; "
         "for a single sequence pass input_ids.unsqueeze(0)")


def check_in_range(name: str, values: torch.Tensor, high: Union[int, torch.Tensor], what: str,
                   id_check: str = "host", low: int = 0) -> None:
    """Every element of ``values`` lies in [low, high) (``high`` an int, or a tensor broadcast against
    ``values``: a bound per element).

    ``id_check="host"`` compares on the host (one GPU synchronisation) and raises ValueError naming
    what was found. ``"device"`` queues the comparison as an asynchronous device-side assertion
    (``torch._assert_async``): no host synchronisation, capturable in a CUDA graph, and a failure
    still stops the program (a CUDA device-side assert, a RuntimeError on CPU). Under torch.compile
    the device check is always used (a host check would break the graph).
    """
    need(id_check in ID_CHECKS, f"id_check must be one of {ID_CHECKS}, got {id_check!r}")
    if not values.numel() or values.device.type == "meta":  # meta tensors hold no values to check
        return
    bound = high if isinstance(high, int) else "the bound of each"
    if id_check == "device" or torch.compiler.is_compiling():
        torch._assert_async(((values >= low) & (values < high)).all(),
                            f"dept_fast: {name} outside [{low}, {bound}) ({what})")
        return
    if isinstance(high, int):
        smallest, largest = (int(v) for v in torch.aminmax(values))
        need(smallest >= low and largest < high,
             f"{name} must lie in [{low}, {high}) ({what}); found values in [{smallest}, {largest}]")
        return
    outside = ~((values >= low) & (values < high))
    if bool(outside.any()):
        raise ValueError(f"{name} must lie in [{low}, {bound}) ({what}); found {values[outside][:8].tolist()} "
                         f"against bounds {torch.broadcast_to(high, values.shape)[outside][:8].tolist()}")


def check_embed_scale(embed_scale: float) -> float:
    """``embed_scale`` as a float: a finite real number (a Python float or int, not a tensor: reading a
    tensor's value would synchronise with its device on every call). Under torch.compile, where the
    value may be symbolic, it is taken as it is (it was checked where the adapter was built)."""
    if torch.compiler.is_compiling():
        return embed_scale
    need(isinstance(embed_scale, numbers.Real) and not isinstance(embed_scale, bool),
         f"embed_scale must be a Python float, got {type(embed_scale).__name__}"
         + (" (pass float(tensor), read once where the adapter is built)" if isinstance(embed_scale, torch.Tensor)
            else ""), TypeError)
    need(math.isfinite(embed_scale), f"embed_scale must be finite, got {embed_scale!r}")
    return float(embed_scale)


def check_dept_inputs(input_ids: torch.Tensor, weight: torch.Tensor, prompt: torch.Tensor,
                      lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    """Validate the DePT stage's tensors (not the id values); raises TypeError/ValueError naming what is wrong."""
    check_token_ids(input_ids)
    for name, t in (("word embeddings", weight), ("prompt", prompt), ("lora_A", lora_A), ("lora_B", lora_B)):
        check_float_tensor(name, t, dims=2)
        need(t.device == weight.device,
             f"{name} is on {t.device} but the word embeddings are on {weight.device}")
    need(input_ids.device == weight.device,
         f"input_ids are on {input_ids.device} but the word embeddings are on {weight.device}; "
         f"move them with input_ids.to({str(weight.device)!r})")
    need(lora_A.dtype == lora_B.dtype,
         f"lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must share a dtype", TypeError)
    dim = weight.shape[1]
    rank = lora_A.shape[1]
    need(prompt.shape[1] == dim, f"prompt has width {prompt.shape[1]}, the word embeddings {dim}")
    need(tuple(lora_B.shape) == (rank, dim),
         f"lora_B must have shape (rank, d) = ({rank}, {dim}), got {tuple(lora_B.shape)}")


def check_prefix_kv_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_layers: int,
                           num_kv_heads: int, head_dim: int) -> None:
    """Raise TypeError/ValueError naming what is wrong with the inputs of the prefix K/V projection."""
    for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        need(isinstance(value, int) and value >= 1, f"{name} must be a positive int, got {value!r}")
    for name, t, dims in (("hidden", hidden, 2), ("weight", weight, 2), ("bias", bias, 1)):
        check_float_tensor(name, t, dims)
        need(0 not in t.shape, f"{name} must be non-empty, got shape {tuple(t.shape)}")
        need(t.device == weight.device, f"{name} is on {t.device} but weight is on {weight.device}")
    n_out = num_layers * 2 * num_kv_heads * head_dim
    need(tuple(weight.shape) == (n_out, hidden.shape[1]),
         f"weight must have shape (layers * 2 * kv_heads * head_dim, mid) = ({n_out}, {hidden.shape[1]}), "
         f"got {tuple(weight.shape)}")
    need(bias.shape[0] == n_out,
         f"bias must have {n_out} elements (layers * 2 * kv_heads * head_dim), got {bias.shape[0]}")


def check_grouped_prefix_kv_inputs(hidden: torch.Tensor, weights, biases, num_layers: int, num_kv_heads: int,
                                   head_dim: int) -> None:
    """Raise TypeError/ValueError naming what is wrong with the inputs of the grouped prefix K/V projection:
    ``hidden`` (G, p, mid), G weights and G biases, each group's valid for :func:`check_prefix_kv_inputs`,
    all weights of one dtype and all biases of one dtype (one launch reads them alike)."""
    check_float_tensor("hidden", hidden, dims=3)
    need(0 not in hidden.shape, f"hidden must be non-empty (G >= 1 groups), got shape {tuple(hidden.shape)}")
    need(isinstance(weights, (list, tuple)) and isinstance(biases, (list, tuple)),
         f"weights and biases must be lists or tuples of tensors, got {type(weights).__name__} and "
         f"{type(biases).__name__}", TypeError)
    need(len(weights) == len(biases) == hidden.shape[0],
         f"hidden has {hidden.shape[0]} groups but {len(weights)} weights and {len(biases)} biases were given")
    for g, (weight, bias) in enumerate(zip(weights, biases)):
        try:
            check_prefix_kv_inputs(hidden[g], weight, bias, num_layers, num_kv_heads, head_dim)
        except (TypeError, ValueError) as e:
            raise type(e)(f"group {g}: {e}") from None
        for name, t, first in (("weight", weight, weights[0]), ("bias", bias, biases[0])):
            need(t.dtype == first.dtype, f"group {g}'s {name} is {t.dtype}, group 0's {first.dtype}: a grouped "
                 "launch needs one dtype per tensor kind", TypeError)
            need(t.device == first.device, f"group {g}'s {name} is on {t.device}, group 0's on {first.device}")
