"""Prefix-Tuning on encoder-decoders as in Li & Liang: encoder, decoder and cross-attention prefixes.

Against references built from the plain model (tests/encoder_decoder_references.py): the cross prefix
equals extra encoder-output vectors (the model's own kernels and cache); all three together equal the
attention-level reference in greedy and beam generate. Then what the decoder-only route has:
``attentions=``, merge, save/load bit-exact, mixed batches of adapters with different prefixes.
The family matrix (tests/test_family_matrix.py) checks logits, loss and every prefix's gradient on
every encoder-decoder family; checkpointing and the Trainer round trip run on BART in
tests/test_prefix_checkpointing.py and tests/test_checkpoint_trainer.py.
"""
import pytest
import torch

from dept_fast import apply_prefix_tuning, load_prefix_tuning
from dept_models import randomized
from encoder_decoder_references import cross_prefix_from_encoder_states, prefix_attention, with_encoder_states
from families import build
from numerics import model_tol, rel_err
from tiny_models import VOCAB

P = 3
DONE_WHEN = pytest.mark.parametrize("family", ["t5", "bart", "mbart"])


def attached(family, projection_dim=None, **kwargs):
    model = apply_prefix_tuning(build(family, dropout=False), P, projection_dim=projection_dim, **kwargs)
    randomized(model.prefix_tuning)
    model.generation_config.eos_token_id = None  # fixed-length generations to compare
    return model


def encoder_inputs(rows=3, length=6):
    """Row 1 right-padded, row 2 left-padded."""
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, VOCAB, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    mask[2, :2] = 0
    return dict(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask)


def decoder_inputs(rows=3):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (rows, 4), generator=gen)
    return dict(decoder_input_ids=ids, labels=ids.roll(-1, 1))


def fixed_prefixes(model):
    return {group: [tuple(t.detach() for t in pair) for pair in encoder.key_values()]
            for group, encoder in model.prefix_tuning.encoders.items()}


@DONE_WHEN
def test_cross_prefix_equals_extra_encoder_states(family):
    """A cross prefix of the cross-attention projections of H is the plain model with [H ; encoder output]
    as the encoder's output: logits, loss, greedy and beam generate."""
    model = attached(family, attentions=("cross",))
    assert list(model.prefix_tuning.encoders) == ["cross"]
    base = build(family, dropout=False)
    base.generation_config.eos_token_id = None
    states = torch.randn(P, base.config.d_model, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        pairs = cross_prefix_from_encoder_states(base, states)
        model.prefix_tuning.encoders["cross"].prefix.copy_(torch.stack([torch.cat(pair) for pair in pairs]))
        enc, dec = encoder_inputs(), decoder_inputs()
        got = model(**enc, **dec)
        extended = with_encoder_states(base, states, **enc)
        want = base(**extended, **dec)
        tol = model_tol(base, enc["input_ids"].numel() + P)
        assert rel_err(got.logits, want.logits) <= tol
        assert rel_err(got.loss, want.loss) <= tol
        for beams in (1, 2):
            tokens = model.generate(**enc, max_new_tokens=4, do_sample=False, num_beams=beams)
            reference = base.generate(**extended, max_new_tokens=4, do_sample=False, num_beams=beams)
            assert torch.equal(tokens, reference), beams


@DONE_WHEN
@pytest.mark.parametrize("beams", [1, 2], ids=["greedy", "beam"])
def test_generate_with_three_prefixes_equals_the_reference(family, beams):
    model = attached(family, projection_dim=8)
    base = build(family, dropout=False)
    base.generation_config.eos_token_id = None
    enc = encoder_inputs()
    options = dict(max_new_tokens=4, do_sample=False, num_beams=beams, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        got = model.generate(**enc, **options)
        with prefix_attention(base, fixed_prefixes(model)):
            reference = base.generate(**enc, **options)
        plain = base.generate(**enc, **options)
    assert torch.equal(got.sequences, reference.sequences)
    tol = model_tol(base, enc["input_ids"].numel() + P + 4)
    for step, (logits, want, without) in enumerate(zip(got.logits, reference.logits, plain.logits)):
        assert rel_err(logits, want) <= tol, step
        assert rel_err(logits, without) > 1e-2, step


@DONE_WHEN
def test_merge_and_save_load_round_trip(family, tmp_path):
    model = attached(family, projection_dim=8)
    enc, dec = encoder_inputs(), decoder_inputs()
    with torch.no_grad():
        before = model(**enc, **dec).logits
        model.prefix_tuning.merge()
        merged = model(**enc, **dec).logits
        assert rel_err(merged, before) <= model_tol(model, enc["input_ids"].numel() + P)
        model.prefix_tuning.save_pretrained(tmp_path)
        loaded = load_prefix_tuning(build(family, dropout=False), tmp_path)
        assert sorted(loaded.prefix_tuning.encoders) == ["cross", "decoder", "encoder"]
        assert torch.equal(loaded(**enc, **dec).logits, merged)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_mixed_batch_of_adapters_with_different_prefixes(family):
    """Rows of the three-prefix adapter, an encoder-and-cross adapter with longer prefixes, and none:
    each row equals the row alone."""
    model = attached(family)
    apply_prefix_tuning(model, P + 2, projection_dim=None, adapter_name="enc-cross", attentions=("encoder", "cross"))
    randomized(model.prefix_adapters["enc-cross"], seed=12)
    names = ["default", "enc-cross", "__base__"]
    enc, dec = encoder_inputs(), decoder_inputs()
    dec.pop("labels")
    with torch.no_grad():
        logits = model(**enc, **dec, adapter_names=names).logits
        tol = model_tol(model, enc["input_ids"].numel() + P + 2)
        for i, name in enumerate(names):
            row = {k: v[i:i + 1] for k, v in {**enc, **dec}.items()}
            alone = model(**row, adapter_names=[name]).logits
            assert rel_err(logits[i:i + 1], alone) <= tol, name
        tokens = model.generate(**enc, max_new_tokens=3, do_sample=False, adapter_names=names)
        for i, name in enumerate(names):
            row = {k: v[i:i + 1] for k, v in enc.items()}
            assert torch.equal(tokens[i:i + 1], model.generate(**row, max_new_tokens=3, do_sample=False,
                                                               adapter_names=[name])), name


def test_attentions_choose_the_groups():
    model = attached("bart", attentions=["encoder", "decoder"])
    assert list(model.prefix_tuning.encoders) == ["encoder", "decoder"]
    assert model.prefix_tuning.encoders["encoder"].prefix.requires_grad


@pytest.mark.parametrize("family, attentions, message", [
    ("gpt2", ("cross",), r"GPT2LMHeadModel has no attention group 'cross' \(cross-attention\).*\('decoder',\)"),
    ("bart", ("encoder", "self"), r"no attention group 'self'.*\('encoder', 'decoder', 'cross'\)"),
    ("bart", "cross", "must be a non-empty sequence"),
    ("t5", (), "must be a non-empty sequence"),
])
def test_unknown_attention_groups_are_refused(family, attentions, message):
    model = build(family)
    with pytest.raises(ValueError, match=message):
        apply_prefix_tuning(model, P, attentions=attentions)
    assert not hasattr(model, "prefix_adapters") and all(p.requires_grad for p in model.parameters())
