"""Error metric and tolerances shared by the parity tests."""
import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| in fp64 (NaN if any NaN survives)."""
    a, e = actual.double(), expected.double()
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item() if e.numel() else 0.0


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
