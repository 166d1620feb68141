"""generate() with prefixes: batch > 1, left padding, greedy and seeded sampling, against a
reference decode loop that reruns the whole sequence without a cache at every step (so the
cached path, where the model's cache holds only real tokens and the prefix is joined in the
attention, must give the tokens and the per-step logits the uncached forward gives)."""
import pytest
import torch

from decoding import assert_same_decoding, generate, reference_decode
from dept_fast import apply_prefix_tuning
from families import FAMILIES, build
from tiny_models import VOCAB


def adapted(name):
    torch.manual_seed(3)
    return apply_prefix_tuning(build(name), 4, projection_dim=None)


def left_padded_batch():
    ids = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_batch_with_left_padding(name):
    model = adapted(name).eval()
    ids, mask = left_padded_batch()
    decoded = generate(model, ids, mask)
    assert_same_decoding(decoded, reference_decode(model, ids, mask))
    # the padded row gives what the row gives alone
    tokens, logits = generate(model, ids[:1, 3:], mask[:1, 3:])
    assert_same_decoding((decoded[0][:1], decoded[1][:1]), (tokens, logits))


@pytest.mark.parametrize("name", FAMILIES)
def test_seeded_sampling_batch_with_left_padding(name):
    """Sampling draws from the same distributions as the uncached reference: with one seed, the
    same tokens (a wrong cached path would change the probabilities and so the draws)."""
    model = adapted(name).eval()
    ids, mask = left_padded_batch()
    decoded = generate(model, ids, mask, sample_seed=5)
    assert decoded[0].min() >= 0 and decoded[0].max() < VOCAB
    assert_same_decoding(decoded, reference_decode(model, ids, mask, sample_seed=5))
    assert not torch.equal(decoded[0], generate(model, ids, mask, sample_seed=6)[0])  # the draws depend on the seed


@pytest.mark.parametrize("name", FAMILIES)
def test_static_cache_decodes_like_the_reference(name):
    """A fixed-size cache (``cache_implementation="static"``, what compiled generation uses) brings a
    4-D mask, or on Qwen2 a dict of them per layer type: the prefixes join it, and the tokens and
    logits are those of the uncached reference."""
    model = adapted(name).eval()
    ids, mask = left_padded_batch()
    decoded = generate(model, ids, mask, cache_implementation="static")
    assert_same_decoding(decoded, reference_decode(model, ids, mask))
