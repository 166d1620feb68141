"""Prefix-Tuning under activation (gradient) checkpointing: the same loss and gradients as without,
non-reentrant or reentrant (switched, with a warning); a reentrant wrapper transformers did not
set is refused; the HF Trainer's activation checkpointing argument trains the same step."""
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from dept_fast import apply_prefix_tuning, enable_activation_checkpointing
from dept_fast.compat import checkpointing_arguments
from families import FAMILIES, build
from numerics import TOL, rel_err
from tiny_models import VOCAB, tiny_gpt2, tiny_llama


def twin_models(name):
    """Two copies of the same model with the same prefix MLP (the fused kernel runs in both), in
    training mode: GPT-2's, T5's and BART's dropout is on, so equality also shows that the recomputation
    replays the same random masks."""
    torch.manual_seed(0)
    first = apply_prefix_tuning(build(name), 4, projection_dim=16).train()
    second = apply_prefix_tuning(build(name), 4, projection_dim=16).train()
    second.prefix_tuning.load_state_dict(first.prefix_tuning.state_dict())
    return first, second


def inputs(model):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    labels = torch.randint(3, VOCAB, (3, 5), generator=gen) if model.config.is_encoder_decoder else ids
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def loss_and_grads(model):
    torch.manual_seed(2)
    loss = model(**inputs(model)).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.prefix_tuning.named_parameters()}


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant-switched"])
@pytest.mark.parametrize("name", list(FAMILIES) + ["bart"])
def test_same_loss_and_gradients_with_checkpointing(name, use_reentrant):
    plain, checkpointed = twin_models(name)
    enable_activation_checkpointing(checkpointed, use_reentrant=use_reentrant)
    expected_loss, expected = loss_and_grads(plain)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, grads = loss_and_grads(checkpointed)
    switched = [w for w in caught if "switched activation checkpointing to use_reentrant=False" in str(w.message)]
    assert len(switched) == (1 if use_reentrant else 0)
    assert torch.allclose(loss, expected_loss, rtol=1e-6, atol=0)
    groups = 3 if checkpointed.config.is_encoder_decoder else 1  # encoder, decoder, cross
    assert set(grads) == set(expected) and len(grads) == 5 * groups
    for key, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, key
        assert rel_err(grad, expected[key]) <= TOL[torch.float32], key


def test_unknown_reentrant_checkpoint_is_refused():
    """A reentrant checkpoint function transformers did not build cannot be switched: the prefix
    attention refuses to run rather than return a wrong gradient."""
    model = apply_prefix_tuning(tiny_llama(), 4, projection_dim=None).train()
    enable_activation_checkpointing(model, use_reentrant=False)
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = lambda fn, *args: checkpoint(fn, *args, use_reentrant=True)
    with pytest.raises(RuntimeError, match="reentrant activation checkpointing"):
        model(**inputs(model))


def test_trainer_with_gradient_checkpointing_takes_the_same_step(tmp_path):
    """One SGD step of the HF Trainer moves the prefixes identically with and without
    activation checkpointing (``TrainingArguments(activation_checkpointing=True)``, or
    ``gradient_checkpointing=True`` before transformers 5.24)."""
    pytest.importorskip("accelerate")  # the Trainer needs it
    from transformers import Trainer, TrainingArguments

    examples = [{k: v[i] for k, v in inputs(tiny_gpt2()).items()} for i in range(3)]
    stepped = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = apply_prefix_tuning(build("gpt2", dropout=False), 4, projection_dim=16)
        args = TrainingArguments(output_dir=str(tmp_path / str(checkpointing)), max_steps=1,
                                 per_device_train_batch_size=3, learning_rate=1.0, optim="sgd",
                                 lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
                                 logging_strategy="no", disable_tqdm=True,
                                 **(checkpointing_arguments() if checkpointing else {}))
        Trainer(model=model, args=args, train_dataset=examples).train()
        stepped.append({k: v.detach().clone() for k, v in model.prefix_tuning.state_dict().items()})
        assert model.transformer.h[0].gradient_checkpointing is checkpointing
    torch.manual_seed(0)
    initial = apply_prefix_tuning(tiny_gpt2(), 4, projection_dim=16).prefix_tuning.state_dict()
    for key, value in stepped[1].items():
        assert not torch.equal(value, initial[key]), key  # the step did move every tensor
        assert rel_err(value, stepped[0][key]) <= TOL[torch.float32], key
