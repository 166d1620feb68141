"""generate() with prefixes: batch > 1, left padding, greedy and seeded sampling, against a
reference decode loop that reruns the whole sequence without a cache at every step (so the
cached path, where the model's cache holds only real tokens and the prefix is joined in the
attention, must give the tokens and the per-step logits the uncached forward gives)."""
import pytest
import torch

from dept_fast import apply_prefix_tuning
from numerics import TOL, rel_err
from tiny_models import VOCAB, tiny_gpt2, tiny_llama, tiny_t5

STEPS = 5
BUILDERS = {"gpt2": tiny_gpt2, "llama-gqa": tiny_llama, "t5": tiny_t5}


def adapted(name):
    torch.manual_seed(3)
    return apply_prefix_tuning(BUILDERS[name](), 4, projection_dim=None)


def left_padded_batch():
    ids = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def reference_decode(model, ids, mask, sample_seed=None):
    """Greedy (or multinomial, seeded as generate() draws) decoding by full uncached forwards."""
    if sample_seed is not None:
        torch.manual_seed(sample_seed)
    encoder_decoder = model.config.is_encoder_decoder
    seq = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id) if encoder_decoder else ids
    seq_mask, steps = mask, []
    for _ in range(STEPS):
        if encoder_decoder:
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=seq, use_cache=False).logits
        else:
            logits = model(input_ids=seq, attention_mask=seq_mask, use_cache=False).logits
        scores = logits[:, -1].float()
        steps.append(scores)
        token = scores.softmax(-1).multinomial(1) if sample_seed is not None else scores.argmax(-1, keepdim=True)
        seq = torch.cat([seq, token], 1)
        seq_mask = torch.cat([seq_mask, torch.ones_like(token)], 1)
    return seq[:, -STEPS:], torch.stack(steps, 1)


def generate(model, ids, mask, sample_seed=None):
    """(new tokens (b, STEPS), their logits (b, STEPS, V)) from generate() with the cache."""
    kwargs = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, eos_token_id=None, do_sample=sample_seed is not None,
                  output_logits=True, return_dict_in_generate=True)
    if sample_seed is not None:
        torch.manual_seed(sample_seed)
        kwargs.update(top_k=0, top_p=1.0, temperature=1.0)
    out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return out.sequences[:, -STEPS:], torch.stack(out.logits, 1)


def assert_same_decoding(got, expected):
    assert torch.equal(got[0], expected[0])
    assert rel_err(got[1], expected[1]) <= TOL[torch.float32]


@pytest.mark.parametrize("name", BUILDERS)
def test_greedy_batch_with_left_padding(name):
    model = adapted(name).eval()
    ids, mask = left_padded_batch()
    decoded = generate(model, ids, mask)
    assert_same_decoding(decoded, reference_decode(model, ids, mask))
    # the padded row gives what the row gives alone
    tokens, logits = generate(model, ids[:1, 3:], mask[:1, 3:])
    assert_same_decoding((decoded[0][:1], decoded[1][:1]), (tokens, logits))


@pytest.mark.parametrize("name", BUILDERS)
def test_seeded_sampling_batch_with_left_padding(name):
    """Sampling draws from the same distributions as the uncached reference: with one seed, the
    same tokens (a wrong cached path would change the probabilities and so the draws)."""
    model = adapted(name).eval()
    ids, mask = left_padded_batch()
    decoded = generate(model, ids, mask, sample_seed=5)
    assert decoded[0].min() >= 0 and decoded[0].max() < VOCAB
    assert_same_decoding(decoded, reference_decode(model, ids, mask, sample_seed=5))
    assert not torch.equal(decoded[0], generate(model, ids, mask, sample_seed=6)[0])  # the draws depend on the seed
