"""Error metric and tolerances shared by the parity tests.

Tolerances follow from the arithmetic, not from a result seen on one machine: CPUs differ in the
order their kernels sum (AVX2 and AVX-512 builds block matmuls differently), so two correct
computations of one value differ by rounding whose size depends on the reduction lengths.
"""
import torch
from torch import nn


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in fp64 (NaN if any NaN survives)."""
    a, e = actual.double(), expected.double()
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item() if e.numel() else 0.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: one rounding to ``dtype`` moves a value by at most u relative."""
    return torch.finfo(dtype).eps / 2


# Tolerance on rel_err for a result rounded once to ``dtype`` from fp32 math: half an ulp of the
# output dtype relative to the largest element is <= eps/2, plus fp32 reduction-order noise
# (<= 1e-5 for the few-hundred-term sums in these tests). fp32 results see only the latter.
TOL = {torch.float32: 2e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}


def rounding_excess(actual: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor, terms: int,
                    ulps: float = 0.5) -> float:
    """How far ``actual`` (in a float dtype) lies beyond "``exact`` rounded once to that dtype, from an
    fp32 computation": the largest |actual - exact| - (``ulps`` ulps of the dtype at ``exact`` + fp32
    noise), where the noise is ``terms`` fp32 unit roundoffs (2**-24) times ``magnitude`` (the sum of
    the absolute values of the terms that made the element). <= 0: every element is right; a second
    rounding (e.g. of a term before the sum) shows up as up to half an ulp more. ``ulps``: 0.5 for
    round-to-nearest, 1 for a cast that rounds toward zero (see INTERPRETER_BF16_ULPS)."""
    a, e = actual.double(), exact.double()
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        return float("nan")
    if not e.numel():
        return 0.0
    _, exponent = torch.frexp(e)  # |e| in [2**(exponent - 1), 2**exponent)
    ulp = torch.finfo(actual.dtype).eps * torch.pow(2.0, exponent.double() - 1)
    noise = terms * 2.0 ** -24 * magnitude.double()
    return ((a - e).abs() - ulps * ulp - noise).max().item()


# The Triton interpreter (3.9) casts fp32 to bf16 by dropping the low 16 bits (toward zero, even with
# fp_downcast_rounding="rtne"); the GPU and PyTorch round to nearest. A kernel's bf16 value on CPU is
# therefore within one ulp of the exact value, not half of one.
INTERPRETER_BF16_ULPS = 1.0


def reduction_lengths(model: nn.Module, tokens: int) -> int:
    """The summed lengths of the reductions one forward of ``model`` over ``tokens`` positions makes:
    every linear layer's input width (each runs once per forward), the attention of every attention
    module over at most ``tokens`` keys and its head width (bounded by the model's widest input), and
    the softmax over the vocabulary."""
    widths = [m.in_features if isinstance(m, nn.Linear) else m.weight.shape[0]
              for m in model.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    attentions = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    attention = sum(1 for m in attentions if not any(o is not m and o in attentions for o in m.modules()))  # innermost
    return sum(widths) + attention * (tokens + max(widths)) + model.get_output_embeddings().weight.shape[0]


def model_tol(model: nn.Module, tokens: int, backward: bool = False, dtype: torch.dtype = torch.float32) -> float:
    """rel_err bound for two fp32 computations of a model's outputs (or gradients) that differ in
    summation order: a sum of n terms in any order is within (n - 1) u of its exact value relative
    to the sum of the terms' magnitudes, and to first order the errors of a chain of reductions add,
    so u x the summed reduction lengths (:func:`reduction_lengths`). A gradient runs the chain back
    once more and sums over the ``tokens`` positions into each parameter."""
    forward = reduction_lengths(model, tokens)
    return unit_roundoff(dtype) * (2 * forward + tokens if backward else forward)


def suite_tol(builders, tokens: int = 64) -> float:
    """:func:`model_tol` (gradients included) of the loosest of the models ``builders`` build: one
    tolerance for a test module that compares outputs and gradients on these families."""
    return max(model_tol(build(), tokens, backward=True) for build in builders.values())
