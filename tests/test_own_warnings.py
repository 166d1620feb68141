"""The guard of tests/own_warnings.py fires: a deprecation warning our code causes is raised, one a
library causes by its own use is left alone; and dept_fast/compat.py takes the current names."""
import warnings

import pytest
import torch

import own_warnings
from dept_fast import enable_activation_checkpointing
from dept_fast.compat import cache_argument, checkpointing_arguments
from tiny_models import tiny_gpt2

NEW_CHECKPOINTING_NAME = hasattr(tiny_gpt2(), "activation_checkpointing_enable")  # transformers >= 5.24


@pytest.fixture
def recorded(monkeypatch):
    """The guard's record, emptied for one test and restored after (provoked warnings must not fail the suite)."""
    monkeypatch.setattr(own_warnings, "recorded", [])
    return own_warnings


@pytest.mark.parametrize("category", [FutureWarning, DeprecationWarning])
def test_a_warning_issued_by_our_code_is_raised(recorded, category):
    with pytest.raises(category, match=r"gone soon \[.* caused by our code at tests/test_own_warnings\.py:\d+"):
        warnings.warn("gone soon", category)
    assert len(recorded.recorded) == 1


def test_other_warnings_pass(recorded):
    with pytest.warns(UserWarning, match="just so"):
        warnings.warn("just so", UserWarning)
    assert recorded.recorded == []


@pytest.mark.skipif(not NEW_CHECKPOINTING_NAME, reason="gradient_checkpointing_enable is deprecated from transformers 5.24")
def test_our_call_of_a_deprecated_transformers_api_is_raised(recorded):
    """transformers attributes this warning to its own file; we made the call, so it is ours."""
    with pytest.raises(FutureWarning, match=r"caused by our code at tests/test_own_warnings\.py"):
        tiny_gpt2().gradient_checkpointing_enable()


@pytest.mark.skipif(not NEW_CHECKPOINTING_NAME, reason="is_gradient_checkpointing is deprecated from transformers 5.24")
def test_a_librarys_own_use_of_a_deprecated_api_is_not_ours(recorded):
    """PEFT reads ``model.is_gradient_checkpointing`` (deprecated in transformers 5.24) when it wraps a model."""
    peft = pytest.importorskip("peft")
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    with pytest.warns(FutureWarning, match="is_gradient_checkpointing"):
        peft.get_peft_model(tiny_gpt2(), config)
    assert recorded.recorded == []


def test_compat_helpers_take_the_installed_names():
    from transformers import TrainingArguments

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated name, whatever the release
        model = enable_activation_checkpointing(tiny_gpt2(), use_reentrant=False)
        assert model.transformer.h[0].gradient_checkpointing
        args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none",
                                 **checkpointing_arguments(use_reentrant=False))
    name = cache_argument(model)
    assert name in ("cache", "past_key_values")
    ids = torch.randint(0, 10, (1, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = model.eval()(input_ids=ids, use_cache=True).past_key_values
        model(input_ids=ids[:, -1:], **{name: cache})
    assert (args.activation_checkpointing if NEW_CHECKPOINTING_NAME else args.gradient_checkpointing) is True
