"""budget(): every (m, r) with l*d = m*d + (s + d)*r, and nothing else."""
import pytest

from dept_fast import budget


def test_t5_base_example_from_the_paper():
    pairs = budget(100, 256, 768)
    assert (60, 30) in pairs and (40, 45) in pairs
    assert pairs[0] == (100, 0) and pairs[-1] == (0, 75)  # prompt tuning itself .. all budget in the update


@pytest.mark.parametrize("l, s, d", [(100, 256, 768), (7, 5, 3), (10, 13, 4), (0, 8, 8), (5, 1000, 6)])
def test_exactly_the_pairs_that_match_the_budget(l, s, d):
    brute = [(m, r) for r in range(l + 1) for m in range(l + 1) if m * d + (s + d) * r == l * d]  # s + d > d: r <= l
    assert budget(l, s, d) == brute


@pytest.mark.parametrize("args", [(-1, 8, 8), (10, 0, 8), (10, 8, 0), (10.0, 8, 8), (True, 8, 8)])
def test_bad_arguments(args):
    with pytest.raises(ValueError, match="must be an int"):
        budget(*args)
