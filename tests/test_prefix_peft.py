"""Ours vs PEFT's PrefixTuning (the pre-filled cache route) on the causal decoders of the family matrix.

Given the same prefix weights (moved over through a PEFT checkpoint, which is also the loading
test), logits, loss and the prefix gradient agree to fp32 rounding on unpadded rows; left-padded
rows follow the documented position convention; greedy generation gives the tokens of greedy
decoding through PEFT's forward.
"""
import pytest
import torch

from dept_fast import load_prefix_tuning
from families import DECODERS
from numerics import TOL, rel_err
from tiny_models import VOCAB, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")  # a test extra; machines without it skip this module
P = 5


def make_peft(build, projection=False):
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection,
                                     encoder_hidden_size=16)
    torch.manual_seed(1)
    return peft.get_peft_model(build(), config)


def ours_from(peft_model, build, path, **save_kwargs):
    peft_model.save_pretrained(path, **save_kwargs)
    return load_prefix_tuning(build(), path)


def peft_prefix_grad(peft_model, encoder):
    """PEFT's prompt_embeddings gradient in our (layers, 2, kv_heads, p, head_dim) layout."""
    grad = peft_model.prompt_encoder.default.embedding.weight.grad
    return grad.view(P, encoder.num_layers, 2, encoder.num_kv_heads, encoder.head_dim).permute(1, 2, 3, 0, 4)


def batch(rows=3, length=7, seed=0):
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("name", DECODERS)
def test_logits_loss_and_gradient_match_peft(name, tmp_path):
    build = DECODERS[name]
    peft_model = make_peft(build)
    ours = ours_from(peft_model, build, tmp_path)
    ids, mask = batch()
    expected = peft_model(input_ids=ids, attention_mask=mask, labels=ids)
    got = ours(input_ids=ids, attention_mask=mask, labels=ids)
    assert rel_err(got.logits, expected.logits) <= TOL[torch.float32]
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-6 * expected.loss.item()
    expected.loss.backward()
    got.loss.backward()
    encoder = ours.prefix_tuning.encoders["decoder"]
    assert rel_err(encoder.prefix.grad, peft_prefix_grad(peft_model, encoder)) <= TOL[torch.float32]


@pytest.mark.parametrize("name", DECODERS)
def test_left_padding_position_convention(name, tmp_path):
    """Our default: a left-padded row's real tokens sit at positions p, p + 1, ... (as in
    generate()), so the row gives the same logits as alone. PEFT's forward counts the pad slots
    (p + column); passing position_ids=arange(L) reproduces that exactly."""
    build = DECODERS[name]
    peft_model = make_peft(build)
    ours = ours_from(peft_model, build, tmp_path)
    ids, mask = batch()
    mask[0, :3] = 0
    padded = ours(input_ids=ids, attention_mask=mask).logits
    alone = ours(input_ids=ids[:1, 3:], attention_mask=mask[:1, 3:]).logits
    assert rel_err(padded[:1, 3:], alone) <= TOL[torch.float32]

    columns = ours(input_ids=ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1])[None]).logits
    expected = peft_model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert rel_err(columns[real], expected[real]) <= TOL[torch.float32]


def peft_greedy(peft_model, ids, mask, steps):
    """Greedy decoding by PEFT's forward without a cache (its generate() disagrees with its own
    forward under transformers >= 5.24, which renamed ``past_key_values`` to ``cache``): each step
    reruns the whole sequence at the positions generate() gives, the index among real tokens
    (PEFT's forward adds p to the position_ids it is given)."""
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = peft_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


@pytest.mark.parametrize("name", DECODERS)
def test_greedy_generate_matches_peft(name, tmp_path):
    build = DECODERS[name]
    peft_model = make_peft(build)
    ours = ours_from(peft_model, build, tmp_path)
    ids, mask = batch(rows=2, length=6, seed=1)
    mask[0, :2] = 0
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, peft_greedy(peft_model, ids, mask, 6))


def test_reads_peft_bin_checkpoint(tmp_path):
    peft_model = make_peft(tiny_gpt2)
    ours = ours_from(peft_model, tiny_gpt2, tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    ids, mask = batch()
    expected = peft_model(input_ids=ids, attention_mask=mask).logits
    assert rel_err(ours(input_ids=ids).logits, expected) <= TOL[torch.float32]


def test_refuses_a_bin_that_is_more_than_tensors(tmp_path):
    peft_model = make_peft(tiny_gpt2)
    peft_model.save_pretrained(tmp_path, safe_serialization=False)
    torch.save({"prompt_embeddings": torch.zeros(1), "payload": object()}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_prefix_tuning(tiny_gpt2(), tmp_path)


@pytest.mark.parametrize("name", DECODERS)
def test_reads_peft_checkpoint_saved_with_projection(name, tmp_path):
    """PEFT evaluates its MLP when saving: the checkpoint holds the prefixes, loaded merged."""
    build = DECODERS[name]
    peft_model = make_peft(build, projection=True)
    ours = ours_from(peft_model, build, tmp_path)
    assert ours.prefix_tuning.encoders["decoder"].merged
    ids, mask = batch()
    expected = peft_model(input_ids=ids, attention_mask=mask).logits
    assert rel_err(ours(input_ids=ids, attention_mask=mask).logits, expected) <= TOL[torch.float32]


def test_peft_checkpoint_of_another_model_is_refused(tmp_path):
    make_peft(tiny_gpt2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"\(layers, kv_heads, head_dim\) = \(2, 4, 10\) in the checkpoint, "
                                         r"\(2, 2, 12\) in the model"):
        load_prefix_tuning(tiny_llama(), tmp_path)
