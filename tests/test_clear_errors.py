"""Bad input gets a clear error where the user hits it, never a deep IndexError or a silently wrong
number: 1-D ids, adapters that do not fit the model's positions, fixed-size generation caches and
the masks they bring (Qwen2's per-layer dict), non-finite lora_alpha, fp64 weights."""
import json
import math

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, StaticCache

from decoding import assert_same_decoding, generate, reference_decode
from dept_fast import FusedDePTEmbedding, apply_dept, apply_prefix_tuning, load_dept
from dept_fast.compat import cache_argument
from dept_models import FAMILY_ROUTES, M, R, ROUTES, S, dept_model, padded_batch
from families import DECODERS, build
from tiny_models import VOCAB, tiny_gpt2


def assert_untouched(model, attn_implementation="sdpa"):
    """A refused apply leaves the model as it was: no adapter, nothing frozen, its own attention."""
    assert not hasattr(model, "dept") and not hasattr(model, "prefix_tuning")
    assert all(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == attn_implementation


@FAMILY_ROUTES
def test_one_dimensional_ids_get_the_unsqueeze_hint(family, share):
    model = dept_model(family, share=share)
    ids = torch.randint(3, VOCAB, (5,))
    hint = r"takes 2-D input_ids \(batch, length\), got \(5,\); for a single sequence pass input_ids.unsqueeze\(0\)"
    with pytest.raises(ValueError, match=hint):
        model(input_ids=ids)
    with pytest.raises(ValueError, match=hint):
        model(ids)  # positionally


@ROUTES
def test_position_limit_is_checked_at_apply(share):
    """GPT-2 holds n_positions = 128 positions: m + max_length = 129 is refused at apply_dept (it
    used to fail at the first long input, deep in F.embedding); 128 fits, and the longest input runs."""
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel holds 128 positions, but num_prompt_tokens \+ max_length = "
                                         r"3 \+ 126 = 129; lower max_length to at most 125"):
        apply_dept(model, M, R, 126, share_prompt=share)
    assert_untouched(model)
    fits = apply_dept(model, M, R, 125, share_prompt=share)
    ids = torch.randint(3, VOCAB, (1, 125))
    logits = fits(input_ids=ids).logits
    assert logits.shape == (1, 125 if fits.dept.share_prompt else M + 125, VOCAB) and torch.isfinite(logits).all()


def test_position_limit_is_checked_at_load(tmp_path):
    FusedDePTEmbedding(nn.Embedding(VOCAB, 40), M, R, 200).save_pretrained(tmp_path)
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=r"holds 128 positions, but num_prompt_tokens \+ max_length = 3 \+ 200"):
        load_dept(model, tmp_path)
    assert_untouched(model)


def test_position_limit_of_a_bert_like_encoder():
    """A bidirectional encoder takes the prompt in every row; its position table bounds m + max_length
    (it used to fail with a size mismatch at the first long input)."""
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    model = BertForMaskedLM(config)
    with pytest.raises(ValueError, match=r"BertForMaskedLM holds 32 positions.*3 \+ 30 = 33; lower max_length to "
                                         r"at most 29"):
        apply_dept(model, M, R, 30)
    assert_untouched(model)
    fits = apply_dept(model, M, R, 29)
    assert not fits.dept.share_prompt
    assert fits(input_ids=torch.randint(3, VOCAB, (2, 29))).logits.shape == (2, M + 29, VOCAB)


@ROUTES
@pytest.mark.parametrize("family", DECODERS)
def test_static_caches_are_refused_on_decoders(family, share):
    """cache_implementation="static" and a StaticCache passed in: a ValueError naming the cache, before
    the 4-D mask (GPT-2, Llama) or per-layer mask dict (Qwen2) it brings reaches the model."""
    model = dept_model(family, share=share)
    ids, mask = padded_batch([5, 3], 5, "left")
    message = r"needs a dynamic generation cache .*got a StaticCache"
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, cache_implementation="static")
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2,
                       **{cache_argument(model): StaticCache(config=model.config, max_cache_len=16)})
    tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert tokens.shape == (2, 7)  # the default dynamic cache still works after a refusal


@ROUTES
def test_per_layer_mask_dict_is_refused(share):
    """Qwen2 builds {layer type: 4-D mask} for fixed-size caches; given one directly, the error says what it is."""
    model = dept_model("qwen2-mqa", share=share)
    ids = torch.randint(3, VOCAB, (2, 5))
    masks = {"full_attention": torch.ones(2, 1, 5, 5, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"2-D attention_mask \(batch, length\), got dict; .*per-layer mask dicts"):
        model(input_ids=ids, attention_mask=masks)


@pytest.mark.parametrize("sample_seed", [None, 7], ids=["greedy", "sampled"])
def test_encoder_decoder_takes_a_static_cache(sample_seed):
    """T5's prompt lives in the encoder; the decoder's fixed-size cache never holds it, so a static
    cache decodes the tokens and logits of full uncached forwards."""
    model = dept_model("t5")
    ids, mask = padded_batch([5, 3], 5, "right")
    with torch.no_grad():
        decoded = generate(model, ids, mask, sample_seed=sample_seed, cache_implementation="static")
        assert_same_decoding(decoded, reference_decode(model, ids, mask, sample_seed=sample_seed))


@pytest.mark.parametrize("lora_alpha", [math.nan, math.inf, -math.inf, True, "8"])
def test_lora_alpha_must_be_a_finite_number(lora_alpha):
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="lora_alpha must be a finite number"):
        apply_dept(model, M, R, S, lora_alpha=lora_alpha)
    assert_untouched(model)
    with pytest.raises(ValueError, match="lora_alpha must be a finite number"):
        FusedDePTEmbedding(nn.Embedding(VOCAB, 8), M, R, S, lora_alpha=lora_alpha)


@pytest.mark.parametrize("lora_alpha", [math.nan, math.inf])
def test_non_finite_lora_alpha_in_a_checkpoint_is_refused(lora_alpha, tmp_path):
    apply_dept(tiny_gpt2(), M, R, S).dept.save_pretrained(tmp_path)
    config_file = tmp_path / "dept_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "lora_alpha": lora_alpha}))  # json writes NaN / Infinity
    with pytest.raises(ValueError, match="lora_alpha' must be a finite number"):
        load_dept(tiny_gpt2(), tmp_path)


def test_fp64_weights_are_refused_at_construction():
    """fp64 has no kernel: refused when the adapter is built, not at the first forward."""
    with pytest.raises(TypeError, match="word embeddings must be float32, float16 or bfloat16, got torch.float64"):
        FusedDePTEmbedding(nn.Embedding(VOCAB, 8).double(), M, R, S)
    for family in ("gpt2", "t5"):
        model = build(family).double()
        with pytest.raises(TypeError, match="float32, float16 or bfloat16, got torch.float64"):
            apply_dept(model, M, R, S)
        assert_untouched(model)
        with pytest.raises(TypeError, match="prefix parameters must be float32, float16 or bfloat16, got torch.float64"):
            apply_prefix_tuning(model, 3)
        assert_untouched(model)
