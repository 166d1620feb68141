"""The shared prompt (apply_dept's default on causal decoders) against the prompt in every row, on
every causal decoder of the family matrix (tests/families.py): logits, loss and every gradient, with and without gradient
checkpointing; what the layers are fed; when the prompt pass runs (never stale); generate(); the
refusals.

Tolerance: both routes compute in fp32 and differ only in summation order (the prompt's attention
runs once at batch 1 instead of per row; the rows' prompt gradients are summed by autograd through
the expand instead of inside each row's graph), so they agree within tests/numerics.py's bound. Any real
mistake (a prompt position missed, a wrong position id, the first input token's loss term left
out) moves these numbers by more than 1e-2.
"""
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from dept_fast import apply_dept, apply_prefix_tuning, enable_activation_checkpointing, serving
from dept_fast.hf import dept as hf_dept
from dept_models import M, R, S
from families import DECODERS, build
from numerics import rel_err, suite_tol
from tiny_models import VOCAB, tiny_gpt2, tiny_qwen2, tiny_t5

TOL = suite_tol(DECODERS)


def twins(family, rank=R):
    """(shared, every-row): the same base model (dropout off) and the same adapter, B non-zero."""
    shared = apply_dept(build(family, dropout=False), M, rank, S)
    every_row = apply_dept(build(family, dropout=False), M, rank, S, share_prompt=False)
    assert shared.dept.share_prompt and not every_row.dept.share_prompt
    with torch.no_grad():
        shared.dept.lora_B.normal_()
    every_row.dept.load_state_dict(shared.dept.state_dict())
    for model in (shared, every_row):
        model.generation_config.eos_token_id = None
    return shared, every_row


def batch(rows=3, length=7):
    """Left-padded rows (the route where positions matter most), labels -100 on pads and one more."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids[0, :2] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 3] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def step(model, inputs):
    out = model(**inputs)
    out.loss.backward()
    adapter = model.dept
    grads = {name: p.grad for name, p in adapter.named_parameters() if p.requires_grad}
    adapter.zero_grad()
    return out, grads


def assert_same_step(shared, every_row, inputs):
    got, got_grads = step(shared, inputs)
    want, want_grads = step(every_row, inputs)
    real = inputs["attention_mask"].bool()  # pad positions' logits are unconstrained
    assert got.logits.shape == (*inputs["input_ids"].shape, VOCAB)  # the input positions only
    assert rel_err(got.logits[real], want.logits[:, M:][real]) <= TOL
    assert rel_err(got.loss, want.loss) <= TOL
    assert set(got_grads) == set(want_grads)
    for name, grad in got_grads.items():
        assert grad.abs().sum() > 0 and rel_err(grad, want_grads[name]) <= TOL, name


@pytest.mark.parametrize("rank", [R, 0], ids=["dept", "prompt-tuning"])
@pytest.mark.parametrize("family", DECODERS)
def test_same_logits_loss_and_gradients(family, rank):
    shared, every_row = twins(family, rank)
    assert_same_step(shared, every_row, batch())


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant-switched"])
@pytest.mark.parametrize("family", DECODERS)
def test_same_step_under_gradient_checkpointing(family, use_reentrant):
    shared, every_row = twins(family)
    enable_activation_checkpointing(shared.train(), use_reentrant=use_reentrant)
    every_row.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_same_step(shared, every_row, batch())
    switched = [w for w in caught if "switched activation checkpointing to use_reentrant=False" in str(w.message)]
    assert len(switched) == int(use_reentrant)


def test_unknown_reentrant_checkpoint_is_refused():
    """A reentrant wrapper transformers did not build would run the prompt pass without recording
    gradients: the capture refuses rather than train the prompt on a zero gradient."""
    shared, _ = twins("llama-gqa")
    enable_activation_checkpointing(shared.train(), use_reentrant=False)
    for module in shared.modules():
        if getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = lambda fn, *args: checkpoint(fn, *args, use_reentrant=True)
    with pytest.raises(RuntimeError, match="reentrant activation checkpointing"):
        shared(**batch())


def test_first_input_token_is_predicted_by_the_prompt():
    """Labels on the first input column only: the whole loss is the prompt's last logit's term."""
    shared, every_row = twins("llama-gqa")
    inputs = batch()
    inputs["labels"] = torch.full_like(inputs["input_ids"], -100)
    inputs["labels"][:, 0] = inputs["input_ids"][:, 0]
    got, want = shared(**inputs).loss, every_row(**inputs).loss
    assert torch.isfinite(got) and rel_err(got, want) <= TOL


def test_loss_reduction_and_tuple_outputs():
    """num_items_in_batch (what the HF Trainer passes) divides both terms; return_dict=False puts
    the loss first, as the model does."""
    shared, every_row = twins("gpt2")
    inputs = batch()
    count = torch.tensor(11)
    got = shared(**inputs, num_items_in_batch=count).loss
    assert rel_err(got, every_row(**inputs, num_items_in_batch=count).loss) <= TOL
    as_tuple = shared(**inputs, return_dict=False)
    assert rel_err(as_tuple[0], shared(**inputs).loss) <= TOL and as_tuple[1].shape == (3, 7, VOCAB)
    inputs["labels"] = torch.cat([torch.full((3, M), -100), inputs["labels"]], 1)  # every-row labels
    with pytest.raises(ValueError, match=r"labels have shape \(3, 10\) but the logits cover \(3, 7\)"):
        shared(**inputs)


def first_layer_inputs(model):
    """Shapes of the hidden states the first decoder layer is fed, call by call."""
    shapes = []
    layers = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple((args[0] if args else kwargs["hidden_states"]).shape)),
        with_kwargs=True)
    return shapes


@pytest.mark.parametrize("family", DECODERS)
def test_layers_see_one_prompt_pass_and_the_inputs(family):
    shared, _ = twins(family)
    shapes = first_layer_inputs(shared)
    d = shared.config.hidden_size
    for _ in range(2):  # training: every call runs its own prompt pass
        step(shared.train(), batch())
    assert shapes == [(1, M, d), (3, 7, d)] * 2


def test_prompt_pass_is_never_stale():
    """Without gradients every call runs its own prompt pass (one per generate() call, shared by its
    steps), so any change to any weight, by any means, shows in the next call."""
    shared, every_row = twins("llama-gqa")
    shapes = first_layer_inputs(shared)
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    real = inputs["attention_mask"].bool()
    prompt_passes = lambda: shapes.count((1, M, 48))  # noqa: E731

    def assert_agree():
        assert rel_err(shared(**inputs).logits[real], every_row(**inputs).logits[:, M:][real]) <= TOL

    changes = {
        "in place (an optimizer step)": lambda model: model.dept.prompt.mul_(1.5),
        ".data write (an EMA update)": lambda model: model.dept.prompt.data.copy_(model.dept.prompt.data * 0.5),
        "base weight .data": lambda model: model.model.layers[0].input_layernorm.weight.data.mul_(1.1),
        "load_state_dict": lambda model: model.dept.load_state_dict(
            {k: v + 0.1 for k, v in model.dept.state_dict().items()}),
    }
    with torch.no_grad():
        shared(**inputs)
        shared(**inputs)
        assert prompt_passes() == 2
        shared.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert prompt_passes() == 3
        for name, change in changes.items():
            for model in (shared, every_row):
                change(model)
            assert_agree()
    shared(**inputs)  # gradients recorded: a pass of its own
    assert prompt_passes() == 4 + len(changes)


def test_serving_context_runs_the_prompt_once():
    shared, every_row = twins("gpt2")
    shapes = first_layer_inputs(shared)
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    prompt_passes = lambda: shapes.count((1, M, 40))  # noqa: E731
    with torch.no_grad():
        expected = shared(**inputs).logits
    with serving(shared):
        with pytest.raises(RuntimeError, match="already open"):
            with serving(shared):
                pass
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(shared(**inputs).logits, expected)
            shared.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert prompt_passes() == 2
        shared(**inputs)  # gradients recorded: a pass of its own
        assert prompt_passes() == 3
    with torch.no_grad():
        shared.dept.prompt.mul_(2.0)
        shared(**inputs)  # the context is closed: the new prompt is used
    assert prompt_passes() == 4


@pytest.mark.parametrize("family", DECODERS)
def test_generate_gives_the_every_row_tokens(family):
    shared, every_row = twins(family)
    inputs = {k: v for k, v in batch(rows=2, length=6).items() if k != "labels"}
    with torch.no_grad():
        greedy = [model.generate(**inputs, max_new_tokens=6, do_sample=False) for model in (shared, every_row)]
        sampled = []
        for model in (shared, every_row):
            torch.manual_seed(5)
            sampled.append(model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=0))
    assert torch.equal(*greedy) and torch.equal(*sampled)
    assert not torch.equal(greedy[0], sampled[0])  # sampling really sampled


def test_where_sharing_is_off_or_refused(monkeypatch):
    t5 = apply_dept(tiny_t5(), M, R, S)
    assert not t5.dept.share_prompt  # its encoder is bidirectional: off by default
    with pytest.raises(ValueError, match="share_prompt=True: T5ForConditionalGeneration is an encoder-decoder"):
        apply_dept(tiny_t5(), M, R, S, share_prompt=True)
    with pytest.raises(TypeError, match="share_prompt must be None, True or False"):
        apply_dept(tiny_gpt2(), M, R, S, share_prompt="yes")
    no_prompt = apply_dept(tiny_gpt2(), 0, R, S, share_prompt=True)
    assert not no_prompt.dept.share_prompt  # nothing to share
    assert no_prompt(input_ids=torch.randint(3, VOCAB, (2, 5))).logits.shape == (2, 5, VOCAB)


def test_sliding_window_must_cover_the_prompt(monkeypatch):
    """A sliding-window layer hides from each token the positions a window or more before it, so with
    the prompt in every row the last of m + max_length positions sees the prompt only if the window
    is at least m + max_length. Narrower: share_prompt=None puts the prompt in every row (the
    model left on its attention), True is refused; shared anyway, the numbers would differ."""
    def sliding(window):
        return tiny_qwen2(use_sliding_window=True, sliding_window=window, max_window_layers=0)

    inputs = {k: v for k, v in batch(length=S).items() if k != "labels"}  # the longest inputs
    fits = apply_dept(sliding(M + S), M, R, S)
    every_row = apply_dept(sliding(M + S), M, R, S, share_prompt=False)
    assert fits.dept.share_prompt
    with torch.no_grad():
        fits.dept.lora_B.normal_()
    every_row.dept.load_state_dict(fits.dept.state_dict())
    real = inputs["attention_mask"].bool()
    assert rel_err(fits(**inputs).logits[real], every_row(**inputs).logits[:, M:][real]) <= TOL
    with pytest.raises(ValueError, match=r"share their prompts .*cannot be exact for this adapter: .*"
                                         r"the prompt and the tokens span 20 positions"):
        apply_dept(fits, M + 1, R, S, adapter_name="longer")  # the model's route is the first adapter's
    assert "longer" not in fits.dept_adapters

    narrow = apply_dept(sliding(M + S - 1), M, R, S)
    assert not narrow.dept.share_prompt and narrow.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match=r"share_prompt=True cannot be exact on this model: Qwen2ForCausalLM has "
                                         r"sliding-window attention layers \(window 18\)"):
        apply_dept(sliding(M + S - 1), M, R, S, share_prompt=True)
    monkeypatch.setattr(hf_dept, "check_attention_window", lambda *args, **kwargs: None)
    forced = apply_dept(sliding(M + S - 1), M, R, S, share_prompt=True)
    with torch.no_grad():
        narrow.dept.load_state_dict(fits.dept.state_dict())
        forced.dept.load_state_dict(fits.dept.state_dict())
        assert rel_err(forced(**inputs).logits[real], narrow(**inputs).logits[:, M:][real]) > 1e-4


def test_attention_that_cannot_be_wrapped():
    """None falls back to the prompt in every row (the model left as it was); True says why."""
    model = tiny_gpt2()
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="share_prompt=True cannot be exact on this model: .*'flash_attention_2'"):
        apply_dept(model, M, R, S, share_prompt=True)
    assert model.config._attn_implementation == "flash_attention_2" and not hasattr(model, "dept")
    model.config._attn_implementation_internal = "sdpa"
    model = apply_dept(tiny_gpt2(attn_implementation="eager"), M, R, S)
    assert model.dept.share_prompt  # eager is wrapped like sdpa


def test_prefix_tuning_and_a_shared_prompt_do_not_mix():
    prefixed = apply_prefix_tuning(tiny_gpt2(), 2, projection_dim=None)
    with pytest.raises(ValueError, match="has Prefix-Tuning prefixes"):
        apply_dept(prefixed, M, R, S, share_prompt=True)
    assert not apply_dept(prefixed, M, R, S).dept.share_prompt  # None: the prompt in every row
    with pytest.raises(ValueError, match="DePT adapter named 'default' sharing its prompt's keys/values"):
        apply_prefix_tuning(apply_dept(tiny_gpt2(), M, R, S), 2)
