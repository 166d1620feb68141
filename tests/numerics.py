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
