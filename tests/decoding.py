"""Decoding references shared by the generate() tests of every adapter: generate() with its cache
against a loop that reruns the whole sequence without a cache at every step, greedy or with seeded
multinomial sampling drawn as generate() draws (top_k 0, top_p 1, temperature 1); and greedy
decoding of each decoder row alone, without its padding."""
import torch

from numerics import TOL, rel_err

STEPS = 5


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


def generate(model, ids, mask, sample_seed=None, **generate_kwargs):
    """(new tokens (b, STEPS), their logits (b, STEPS, V)) from generate() with the cache (``generate_kwargs``
    choose it, e.g. ``cache_implementation="static"``)."""
    kwargs = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, eos_token_id=None, do_sample=sample_seed is not None,
                  output_logits=True, return_dict_in_generate=True, **generate_kwargs)
    if sample_seed is not None:
        torch.manual_seed(sample_seed)
        kwargs.update(top_k=0, top_p=1.0, temperature=1.0)
    out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return out.sequences[:, -STEPS:], torch.stack(out.logits, 1)


def assert_same_decoding(got, expected):
    assert torch.equal(got[0], expected[0])
    assert rel_err(got[1], expected[1]) <= TOL[torch.float32]


def greedy_without_cache(model, ids, mask, steps):
    """Reference greedy decoding: the whole sequence re-run at every step (the first-pass path only).
    Decoder-only rows are run one by one without their padding, so every step of a DePT model takes
    the fused kernel; an encoder-decoder runs the batch."""
    if model.config.is_encoder_decoder:
        out = ids.new_zeros(ids.shape[0], 1)  # decoder_start_token_id
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=out, use_cache=False).logits
            out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], 1)
        return out
    rows = []
    for row_ids, row_mask in zip(ids, mask):
        seq = row_ids[row_mask.bool()][None]
        for _ in range(steps):
            logits = model(input_ids=seq, use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
        rows.append(seq[0, -steps:])
    return torch.stack(rows)
