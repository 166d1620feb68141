"""The scale a model's own embedding module applies to its rows, derived by running it.

DePT's stage builds ``E[ids]`` from the embedding table inside its fused kernel, so it must produce
exactly what the model's embedding module returns for those ids. Many modules return the table's
rows; some scale them in their own ``forward`` (Gemma's ``embed_scale``, BART's with
``scale_embedding``), as a subclass of ``nn.Embedding``. :func:`embedding_scale` finds the one
multiplier ``c`` with ``module(ids) == c * weight[ids]`` (rounded as the module rounds) from the
module's output, whatever its class, and refuses a module whose output is anything else.
"""
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import gathered

PROBE_IDS = 64
"""Random token ids the module is run on (with the first and last id and its padding id)."""


def _probe_ids(vocab: int, padding_idx, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    ids: List[int] = [0, vocab - 1] + ([padding_idx] if padding_idx is not None else [])
    ids += torch.randint(0, vocab, (PROBE_IDS,), generator=generator).tolist()
    return torch.tensor(ids, device=device)[None]


def _as_module_computes(rows: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``scale * rows`` as DePT's kernel computes it: in fp32, rounded once to ``dtype``."""
    return (rows.float() * scale).to(dtype)


def _scale_interval(out: torch.Tensor, rows: torch.Tensor):
    """(sign, lo, hi): every c with |c| in [lo, hi] and c's sign rounds ``rows * c`` to ``out`` on the
    elements where both are non-zero (each element bounds |c| by its output's rounding interval)."""
    both = (out != 0) & (rows != 0)
    o, g = out[both], rows[both]
    if not o.numel():
        return 1.0, 1.0, 1.0
    magnitude = o.abs()
    above = torch.nextafter(magnitude, torch.full_like(magnitude, float("inf"))).double() - magnitude.double()
    below = magnitude.double() - torch.nextafter(magnitude, torch.zeros_like(magnitude)).double()
    lo = ((magnitude.double() - below / 2) / g.double().abs()).max().item()
    hi = ((magnitude.double() + above / 2) / g.double().abs()).min().item()
    sign = 1.0 if ((o > 0) == (g > 0)).float().mean() >= 0.5 else -1.0
    return sign, lo, hi


def _candidates(module: nn.Module, sign: float, lo: float, hi: float, dtype: torch.dtype) -> List[float]:
    """Scales to try, simplest first: the module's own scalar attributes and buffers (a scale it
    multiplies by, held as a float or fp32 tensor and perhaps cast to its dtype), then the value with
    the fewest mantissa bits inside the interval the output allows, then its middle."""
    held = [value for value in vars(module).values() if isinstance(value, (int, float)) and not isinstance(value, bool)]
    held += [t.item() for t in list(vars(module).values()) + list(module.buffers(recurse=False))
             if isinstance(t, torch.Tensor) and t.numel() == 1 and t.is_floating_point()]
    middle = sign * (lo + hi) / 2
    found = [float(torch.tensor(v, dtype=d).item()) for v in held for d in (torch.float32, dtype)]
    exponent = torch.tensor(abs(middle)).log2().floor().item() if middle else 0.0
    for bits in range(24):  # |middle| rounded to `bits` mantissa bits, if the output allows it
        step = 2.0 ** (exponent - bits)
        simple = round(abs(middle) / step) * step
        if lo <= simple <= hi:
            found.append(sign * simple)
            break
    found += [torch.tensor(middle, dtype=d).item() for d in (torch.float32, dtype)]
    return list(dict.fromkeys(found))


def embedding_scale(module: nn.Embedding) -> float:
    """The multiplier ``c`` (a Python float) with ``module(ids) == c * module.weight[ids]`` for every id,
    derived from the module's output on a few ids and then checked bit for bit on them.

    Raises ValueError, naming the module's class, when no single multiplier reproduces its output
    (e.g. it adds something, or depends on more than the ids): DePT could not build its inputs."""
    weight = module.weight
    if weight.device.type == "meta":
        raise ValueError(f"{type(module).__name__}'s weight is on the meta device: its scale cannot be derived from "
                         "values; attach the adapter once the weights are loaded, or pass embed_scale")
    with torch.no_grad(), gathered([weight]):
        ids = _probe_ids(weight.shape[0], module.padding_idx, weight.device)
        out = module(ids)
        rows = F.embedding(ids, weight)
        if out.shape != rows.shape or out.dtype != rows.dtype:
            raise ValueError(f"{type(module).__name__} returns {tuple(out.shape)} {out.dtype} for ids {tuple(ids.shape)}, "
                             f"not rows of its weight ({tuple(rows.shape)} {rows.dtype}); DePT cannot build its inputs")
        sign, lo, hi = _scale_interval(out, rows)
        middle = sign * (lo + hi) / 2
        for candidate in _candidates(module, sign, lo, hi, weight.dtype):
            if torch.equal(_as_module_computes(rows, candidate, weight.dtype), out):
                return candidate
        error = (out.double() - rows.double() * middle).abs().max().item()
    raise ValueError(f"{type(module).__name__}'s output is not its weight's rows times one scale (the best single "
                     f"scale, {middle:.6g}, leaves an error of {error:.3g}): DePT builds E[ids] from the weight and "
                     "cannot reproduce what this embedding module computes")
