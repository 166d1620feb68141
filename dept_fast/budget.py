"""DePT's parameter budget: the (m, r) splits that train exactly as many numbers as prompt tuning."""
from typing import List, Tuple


def budget(prompt_len: int, max_length: int, hidden: int) -> List[Tuple[int, int]]:
    """All (m, r) with ``prompt_len * hidden == m * hidden + (max_length + hidden) * r`` exactly.

    A DePT adapter with m prompt tokens and a rank-r update over ``max_length`` positions then has
    the trainable-parameter count of vanilla prompt tuning with ``prompt_len`` tokens (the DePT
    paper's comparison). Pairs are sorted by rank, from (prompt_len, 0) (prompt tuning itself) to
    the largest rank that fits; the T5-base example ``budget(100, 256, 768)`` contains (60, 30) and
    (40, 45).

    Args:
        prompt_len: l, the prompt-tuning length to match (>= 0).
        max_length: s, the input positions the update covers (>= 1).
        hidden: d, the model's embedding width (>= 1).
    """
    for name, value, low in (("prompt_len", prompt_len, 0), ("max_length", max_length, 1), ("hidden", hidden, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    total = prompt_len * hidden
    per_rank = max_length + hidden
    pairs = []
    for rank in range(total // per_rank + 1):
        rest = total - per_rank * rank  # what the prompt may still spend
        if rest % hidden == 0:
            pairs.append((rest // hidden, rank))
    return pairs
