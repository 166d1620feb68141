"""apply_dept on the model families (tests/families.py): parity with the eager composition, padding and
position conventions, generate(), and clear errors. Decoder-only tests run both routes of the
prompt: shared (the default, ``share_prompt=None``; logits cover the inputs only) and in every row
(``share_prompt=False``). tests/test_shared_prompt.py compares the two routes directly.

Tolerances: the fused kernel and the eager reference both compute in fp32 and differ only in
summation order, so outputs and gradients agree within tests/numerics.py's bound for these models
(u x their reduction lengths), far below any real mistake (a wrong A row moves logits by > 1e-2).
"""
import pytest
import torch

import dept_fast.modules.dept_embedding as dept_embedding_module
from decoding import assert_same_decoding, generate, greedy_without_cache, reference_decode
from dept_fast import FusedDePTEmbedding, apply_dept, dept_embedding_reference, enable_activation_checkpointing
from dept_models import FAMILY_ROUTES, M, R, ROUTES, S, dept_model, padded_batch
from families import DECODERS, FAMILIES, build
from numerics import rel_err, suite_tol
from tiny_models import VOCAB, tiny_gpt2

TOL = suite_tol(FAMILIES)


def grads(adapter):
    out = [p.grad.clone() for p in (adapter.prompt, adapter.lora_A, adapter.lora_B)]
    adapter.zero_grad()
    return out


def ones(rows, cols):
    return torch.ones(rows, cols, dtype=torch.long)


def test_apply_freezes_base_and_attaches_adapter():
    model = apply_dept(tiny_gpt2(), M, R, S)
    assert isinstance(model.dept, FusedDePTEmbedding) and model.dept.word_embeddings is model.get_input_embeddings()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"dept_adapters.default.prompt", "dept_adapters.default.lora_A", "dept_adapters.default.lora_B"}
    assert not any("word_embeddings" in k for k in model.state_dict())  # E is saved once, as wte
    with pytest.raises(ValueError, match="already has a DePT adapter"):
        apply_dept(model, M, R, S)
    pt = apply_dept(tiny_gpt2(), M, 0, S)
    assert {n for n, p in pt.named_parameters() if p.requires_grad} == {"dept_adapters.default.prompt"}


@FAMILY_ROUTES
def test_forward_loss_and_grads_match_eager_composition(family, share, monkeypatch):
    """Right-padded batch: the fused kernel, m ones in the mask, m x -100 labels for decoder-only."""
    calls = []
    monkeypatch.setattr(dept_embedding_module, "dept_embedding_at_positions", lambda *a, **k: calls.append(a))
    torch.manual_seed(1)
    model, base = dept_model(family, share=share), build(family)
    ids, mask = padded_batch([7, 5], 7, "right")
    seq2seq = model.config.is_encoder_decoder
    labels = torch.randint(3, VOCAB, (2, 4)) if seq2seq else ids.masked_fill(mask == 0, -100)

    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert not calls, "right padding must take the fused kernel"
    d = model.dept
    got = grads(d)
    embeds = dept_embedding_reference(ids, d.weight, d.prompt, d.lora_A, d.lora_B, d.scaling)
    ext_labels = labels if seq2seq else torch.cat([torch.full((2, M), -100), labels], 1)
    ref = base(inputs_embeds=embeds, attention_mask=torch.cat([ones(2, M), mask], 1), labels=ext_labels)
    ref.loss.backward()

    real = slice(None) if seq2seq else torch.cat([ones(2, M), mask], 1).bool()  # pad logits are unconstrained
    ref_logits = ref.logits
    if d.share_prompt:  # logits of the input positions only
        ref_logits, real = ref_logits[:, M:], real[:, M:]
    assert out.logits.shape == ref_logits.shape
    assert rel_err(out.logits[real], ref_logits[real]) <= TOL
    assert rel_err(out.loss, ref.loss) <= TOL
    for name, g, want in zip(("prompt", "lora_A", "lora_B"), got, grads(d)):
        assert rel_err(g, want) <= TOL, name


@ROUTES
@pytest.mark.parametrize("family", DECODERS)
def test_left_padded_rows_match_rows_alone(family, share):
    """Position convention: each token's A row and model position count its row's real tokens."""
    model = dept_model(family, share=share)
    lengths = [6, 3]
    ids, mask = padded_batch(lengths, 6, "left")
    batch = model(input_ids=ids, attention_mask=mask).logits
    for row, n in enumerate(lengths):
        alone = model(input_ids=ids[row:row + 1, 6 - n:]).logits[0]
        assert rel_err(batch[row, -n:], alone[-n:]) <= TOL
        if not model.dept.share_prompt:
            assert rel_err(batch[row, :M], alone[:M]) <= TOL


def test_t5_left_padded_rows_match_rows_alone():
    """T5's relative positions: each row's prompt sits just before its first real token (its padding
    first), so a left-padded row's logits and greedy tokens are the row's alone."""
    model = dept_model("t5")
    lengths = [6, 3]
    ids, mask = padded_batch(lengths, 6, "left")
    decoder_ids = torch.randint(3, VOCAB, (2, 4))
    batch = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    for row, n in enumerate(lengths):
        real = ids[row:row + 1, 6 - n:]
        alone = model(input_ids=real, decoder_input_ids=decoder_ids[row:row + 1]).logits
        assert rel_err(batch[row:row + 1], alone) <= TOL
        with torch.no_grad():
            assert torch.equal(tokens[row:row + 1], model.generate(input_ids=real, max_new_tokens=4, do_sample=False))


@ROUTES
@pytest.mark.parametrize("family", DECODERS)
def test_column_positions_on_request(family, share):
    """position_ids=arange(L) gives every token its column (PEFT's and the DePT authors' convention)."""
    model, base = dept_model(family, share=share), build(family)
    ids, mask = padded_batch([6, 3], 6, "left")
    got = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(6)[None]).logits
    d = model.dept
    embeds = dept_embedding_reference(ids, d.weight, d.prompt, d.lora_A, d.lora_B, d.scaling)
    ref = base(inputs_embeds=embeds, attention_mask=torch.cat([ones(2, M), mask], 1)).logits
    real = torch.cat([ones(2, M), mask], 1).bool()
    if d.share_prompt:
        ref, real = ref[:, M:], real[:, M:]
    assert rel_err(got[real], ref[real]) <= TOL


@FAMILY_ROUTES
def test_greedy_generate_matches_full_recompute(family, share):
    """Cached decoding (update row = position, prompt only in the first pass or shared) on a batch
    of 2, left padded for decoder-only models, gives the tokens of re-running each whole sequence."""
    model = dept_model(family, share=share)
    seq2seq = model.config.is_encoder_decoder
    ids, mask = padded_batch([5, 3], 5, "right" if seq2seq else "left")
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        assert torch.equal(tokens, model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5,
                                                  do_sample=False))
        want = greedy_without_cache(model, ids, mask, 5)
    assert torch.equal(tokens if seq2seq else tokens[:, -5:], want)


@FAMILY_ROUTES
def test_seeded_sampling_matches_uncached_sampling(family, share):
    """Sampling draws from the distributions of full uncached forwards: with one seed, the same
    tokens and per-step logits (a wrong cached step would change the probabilities, so the draws)."""
    model = dept_model(family, share=share)
    ids, mask = padded_batch([5, 3], 5, "right" if model.config.is_encoder_decoder else "left")
    with torch.no_grad():
        decoded = generate(model, ids, mask, sample_seed=7)
        assert_same_decoding(decoded, reference_decode(model, ids, mask, sample_seed=7))
        assert not torch.equal(decoded[0], generate(model, ids, mask, sample_seed=8)[0])  # the draws depend on it


@ROUTES
def test_vanilla_prompt_tuning_through_the_same_api(share):
    model = dept_model("llama-gqa", rank=0, share=share)
    ids, mask = padded_batch([5, 5], 5, "right")
    embeds_seen = []
    model.model.register_forward_pre_hook(lambda mod, args, kw: embeds_seen.append(kw["inputs_embeds"]),
                                          with_kwargs=True)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    d = model.dept
    want = torch.cat([d.prompt.detach().expand(2, -1, -1), d.word_embeddings(ids)], 1)
    if d.share_prompt:  # the prompt alone (batch 1), then the tokens alone
        assert [tuple(e.shape) for e in embeds_seen] == [(1, M, 48), (2, 5, 48)]
        embeds_seen = [torch.cat([embeds_seen[0].expand(2, -1, -1), embeds_seen[1]], 1)]
    assert torch.equal(embeds_seen[0], want)
    assert d.prompt.grad.abs().sum() > 0 and d.lora_A.grad is None


def test_errors_name_the_problem():
    model = dept_model("gpt2")
    ids = torch.randint(3, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.randn(2, 5, 40))
    with pytest.raises(ValueError, match="max_length"):
        model(input_ids=torch.randint(3, VOCAB, (1, S + 1)))
    with pytest.raises(ValueError, match=r"token positions must lie in \[0, 16\).*found values in \[16, 16\]"):
        model.generate(input_ids=ids, attention_mask=ones(2, 5), max_new_tokens=S, do_sample=False)
    with pytest.raises(ValueError, match="2-D attention_mask"):
        model(input_ids=ids, attention_mask=torch.ones(2, 1, 5, 5))
    with pytest.raises(ValueError, match="attention_mask has 4 columns"):
        model(input_ids=ids, attention_mask=ones(2, 4))
    with pytest.raises(ValueError, match="token_type_ids"):
        model(input_ids=ids, token_type_ids=torch.zeros_like(ids))
    with pytest.raises(TypeError, match="expected a transformers model"):
        apply_dept(torch.nn.Linear(2, 2), M, R, S)
    model.get_input_embeddings = lambda: torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="Linear does not take token ids"):
        apply_dept(model, M, R, S)


@ROUTES
def test_gradient_checkpointing_gives_the_same_step(share):
    results = []
    for checkpointing in (False, True):
        model = dept_model("llama-gqa", share=share).train()
        if checkpointing:
            enable_activation_checkpointing(model)
        ids, mask = padded_batch([6, 4], 6, "left")
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        results.append([loss.detach()] + grads(model.dept))
    for plain, checkpointed in zip(*results):
        assert torch.equal(plain, checkpointed)
