"""The family matrix (tests/families.py): every DePT route, Prefix-Tuning, the mixed batch and generate
on twenty-one families, each exact against a reference built from the plain model
(tests/family_references.py) or refused when the adapter is attached, with the model left as it was.

Tolerances: tests/numerics.py ``model_tol`` (fp32 rounding bounded by the model's reduction lengths).
"""
import re

import pytest
import torch

from dept_fast import apply_dept, apply_prefix_tuning
from dept_models import randomized
from families import EXACT, MATRIX, build
from encoder_decoder_references import prefix_attention
from family_references import dept_forward, greedy, prefix_forward
from numerics import model_tol, rel_err
from tiny_models import VOCAB

M, R, S, P = 3, 4, 16, 3
FAMILY = pytest.mark.parametrize("family", MATRIX)
DEPT_ROUTES = pytest.mark.parametrize("route, share", [("dept-shared", None), ("dept-every-row", False)],
                                      ids=["shared", "every-row"])


def state(model):
    """What attaching must leave as it was when it refuses."""
    hooks = [(n, len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()]
    return (hooks, [(n, p.requires_grad) for n, p in model.named_parameters()], model.config._attn_implementation,
            sorted(model._modules), getattr(model.config, "dept_fast", None))


def attach_or_refused(family, attach):
    """``attach(model)`` on the family's model (no dropout), or, where the contract says refused, the
    check that it raises the contract's error and leaves the model as it was (then None)."""
    model = build(family, dropout=False)
    outcome = MATRIX[family].outcome(attach.route)
    if not outcome.startswith("refused: "):
        return attach(model), outcome
    before = state(model)
    with pytest.raises((ValueError, TypeError), match=re.escape(outcome[len("refused: "):])):
        attach(model)
    assert state(model) == before
    return None, outcome


def attacher(route, function):
    """``function`` (model -> model) tagged with the matrix route it attaches."""
    function.route = route
    return function


def right_padded(encoder_decoder, rows=2, length=6):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1:, length - 2:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    if encoder_decoder:
        decoder_ids = torch.randint(3, VOCAB, (rows, 3), generator=gen)
        return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, labels=decoder_ids.roll(-1, 1))
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def leaves(tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


@FAMILY
@DEPT_ROUTES
def test_dept_equals_the_plain_model_fed_its_inputs(family, route, share):
    model, outcome = attach_or_refused(family, attacher(route, lambda m: apply_dept(m, M, R, S, share_prompt=share)))
    if model is None:
        return
    base = build(family, dropout=False)
    adapter = randomized(model.dept)
    assert adapter.share_prompt == (route == "dept-shared" and outcome == EXACT and not base.config.is_encoder_decoder)
    inputs = right_padded(base.config.is_encoder_decoder)
    out = model(**inputs)
    out.loss.backward()

    tensors = leaves([adapter.prompt, adapter.lora_A, adapter.lora_B])
    extra = {k: v for k, v in inputs.items() if k == "decoder_input_ids"}
    ref = dept_forward(base, inputs["input_ids"], inputs["attention_mask"], tensors, adapter.scaling,
                       labels=inputs["labels"], **extra)
    ref.loss.backward()
    tokens = inputs["input_ids"].numel() + M * inputs["input_ids"].shape[0]
    tol = model_tol(base, tokens, backward=True)
    ref_logits = ref.logits
    if not base.config.is_encoder_decoder:  # real positions only (padding logits are unconstrained)
        real = torch.cat([torch.ones(2, M, dtype=torch.bool), inputs["attention_mask"].bool()], 1)
        if adapter.share_prompt:  # logits of the input positions only
            real, ref_logits = real[:, M:], ref_logits[:, M:]
        ref_logits, got_logits = ref_logits[real], out.logits[real]
    else:
        got_logits = out.logits
    assert rel_err(got_logits, ref_logits) <= tol
    assert rel_err(out.loss, ref.loss) <= tol
    for name, p, leaf in zip(("prompt", "lora_A", "lora_B"), (adapter.prompt, adapter.lora_A, adapter.lora_B), tensors):
        assert rel_err(p.grad, leaf.grad) <= tol, name


def prefix_key_values(encoder):
    return [tuple(t.detach().clone().requires_grad_(True) for t in pair) for pair in encoder.key_values()]


@FAMILY
def test_prefix_equals_the_plain_model_with_a_prefilled_cache(family):
    model, _ = attach_or_refused(family, attacher("prefix", lambda m: apply_prefix_tuning(m, P, projection_dim=None)))
    if model is None:
        return
    randomized(model.prefix_tuning)
    base = build(family, dropout=False)
    if base.config.is_encoder_decoder:
        return _encoder_decoder_prefix_matches_the_reference(model, base)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, 5), generator=gen)
    mask = torch.ones_like(ids)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    encoder = model.prefix_tuning.encoders["decoder"]
    key_values = prefix_key_values(encoder)
    ref = prefix_forward(base, ids, mask, key_values, labels=ids)
    ref.loss.backward()
    tol = model_tol(base, ids.numel() + 2 * P, backward=True)
    assert rel_err(out.logits, ref.logits) <= tol
    assert rel_err(out.loss, ref.loss) <= tol
    want = torch.stack([torch.stack([k.grad[0], v.grad[0]]) for k, v in key_values])
    assert rel_err(encoder.prefix.grad, want) <= tol


def _encoder_decoder_prefix_matches_the_reference(model, base):
    """The paper's three prefixes against the plain model attending to them at the attention level
    (tests/encoder_decoder_references.py): logits, loss, every prefix's gradient."""
    inputs = right_padded(True)
    out = model(**inputs)
    out.loss.backward()
    encoders = model.prefix_tuning.encoders
    assert sorted(encoders) == ["cross", "decoder", "encoder"]
    prefixes = {group: prefix_key_values(encoder) for group, encoder in encoders.items()}
    with prefix_attention(base, prefixes):
        ref = base(**inputs)
    ref.loss.backward()
    tol = model_tol(base, inputs["input_ids"].numel() + 2 * P, backward=True)
    assert rel_err(out.logits, ref.logits) <= tol
    assert rel_err(out.loss, ref.loss) <= tol
    assert rel_err(out.logits, base(**inputs).logits) > 1e-2
    for group, encoder in encoders.items():
        want = torch.stack([torch.stack([k.grad[0], v.grad[0]]) for k, v in prefixes[group]])
        assert rel_err(encoder.prefix.grad, want) <= tol, group


def mixed_adapters(family):
    """The family's model with every adapter kind it takes: DePT "dept" (m 3, r 4), prompt tuning "pt"
    (m 2) and "pt3" (m 3), Prefix-Tuning "prefix" (p 3); and the adapters' names."""
    contract = MATRIX[family]
    model = build(family, dropout=False)
    names = []
    if not contract.dept_every_row.startswith("refused"):
        apply_dept(model, M, R, S, adapter_name="dept")
        apply_dept(model, 2, 0, S, adapter_name="pt")
        apply_dept(model, M, 0, S, adapter_name="pt3")
        names += ["dept", "pt", "pt3"]
    if not contract.prefix.startswith("refused"):
        apply_prefix_tuning(model, P, projection_dim=None, adapter_name="prefix")
        names.append("prefix")
    for adapter in list(getattr(model, "dept_adapters", {}).values()) + list(getattr(model, "prefix_adapters",
                                                                                   {}).values()):
        randomized(adapter)
    return model, names


@FAMILY
def test_mixed_batch_rows_equal_rows_alone(family):
    """Every adapter and the plain model in one batch; where the contract refuses prompts of different
    lengths in one batch, that refusal, and then the adapters whose prompts are m long."""
    model, names = mixed_adapters(family)
    if not names:
        pytest.skip("the family takes neither adapter (both refused: test_dept_*, test_prefix_*)")
    names = names + ["__base__"]
    refusal = MATRIX[family].mixed
    if refusal != EXACT:
        inputs = {k: v for k, v in right_padded(model.config.is_encoder_decoder, rows=len(names)).items()
                  if k != "labels"}
        with pytest.raises(ValueError, match=re.escape(refusal[len("refused: "):])):
            model(**inputs, adapter_names=names)
        names = ["dept", "pt3"]
    inputs = {k: v for k, v in right_padded(model.config.is_encoder_decoder, rows=len(names)).items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, adapter_names=names).logits
        tol = model_tol(model, inputs["input_ids"].numel() + M * len(names))
        for i, name in enumerate(names):
            real = inputs["attention_mask"][i].bool()
            row = {k: v[i:i + 1] for k, v in inputs.items()}
            if not model.config.is_encoder_decoder:
                row = {k: v[:, real] for k, v in row.items()}
            alone = model(**row, adapter_names=[name]).logits[0]
            got = logits[i]
            if not model.config.is_encoder_decoder:  # the row's own positions: last len(alone) of its real ones
                slots = logits.shape[1] - real.shape[0]
                got = got[torch.cat([torch.ones(slots, dtype=torch.bool), real])][-alone.shape[0]:]
            assert rel_err(got, alone) <= tol, name


STEPS = 4


@FAMILY
@DEPT_ROUTES
def test_dept_greedy_generate_equals_the_plain_models_decoding(family, route, share):
    model, _ = attach_or_refused(family, attacher(route, lambda m: apply_dept(m, M, R, S, share_prompt=share)))
    if model is None:
        return
    adapter = randomized(model.dept)
    model.generation_config.eos_token_id = None
    base = build(family, dropout=False)
    ids = torch.randint(3, VOCAB, (2, 4), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    tensors = [adapter.prompt.detach(), adapter.lora_A.detach(), adapter.lora_B.detach()]
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False)
        if base.config.is_encoder_decoder:
            encoder_out = dept_forward(base.get_encoder(), ids, mask, tensors, adapter.scaling)
            start = torch.full((2, 1), base.config.decoder_start_token_id)
            enc_mask = torch.cat([torch.ones(2, M, dtype=mask.dtype), mask], 1)
            want = greedy(lambda seq: base(encoder_outputs=encoder_out, attention_mask=enc_mask,
                                           decoder_input_ids=seq).logits[:, -1], start, STEPS)
            assert torch.equal(tokens[:, 1:], want)
        else:
            want = greedy(lambda seq: dept_forward(base, seq, torch.ones_like(seq), tensors, adapter.scaling)
                          .logits[:, -1], ids, STEPS)
            assert torch.equal(tokens[:, ids.shape[1]:], want)


@FAMILY
def test_prefix_greedy_generate_equals_the_plain_models_decoding(family):
    model, _ = attach_or_refused(family, attacher("prefix", lambda m: apply_prefix_tuning(m, P, projection_dim=None)))
    if model is None or model.config.is_encoder_decoder:  # T5: tests/test_prefix_generate.py
        return
    randomized(model.prefix_tuning)
    model.generation_config.eos_token_id = None
    base = build(family, dropout=False)
    ids = torch.randint(3, VOCAB, (2, 2), generator=torch.Generator().manual_seed(9))  # p + 2 + 3 steps: in a window
    key_values = [tuple(t.detach() for t in pair) for pair in model.prefix_tuning.encoders["decoder"].key_values()]
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        want = greedy(lambda seq: prefix_forward(base, seq, torch.ones_like(seq), key_values).logits[:, -1], ids, 3)
    assert torch.equal(tokens[:, ids.shape[1]:], want)


def test_prefix_beyond_a_sliding_window_is_refused():
    """PEFT's cache route hides the prefix from tokens a window away; the prefix attention would not: refused."""
    model = apply_prefix_tuning(build("mistral"), P, projection_dim=None)
    fits = torch.randint(3, VOCAB, (1, 16 - P))
    model(input_ids=fits)
    with pytest.raises(ValueError, match=r"window 16\), which hide the prefix from tokens 16 or more positions"):
        model(input_ids=torch.randint(3, VOCAB, (1, 16 - P + 1)))

