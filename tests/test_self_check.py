"""The self-check every attach runs (dept_fast/hf/verify.py), on deliberately odd models that it must
refuse, leaving the model exactly as it was; and the derivation of the embedding scale."""
import pytest
import torch
from torch import nn
from transformers import GPT2LMHeadModel, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from dept_fast import FusedDePTEmbedding, apply_dept, apply_prefix_tuning
from dept_fast.modules.embedding_scale import embedding_scale
from families import build
from tiny_models import VOCAB, tiny_gemma, tiny_gpt2, tiny_llama


def state(model):
    hooks = [(n, dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in model.named_modules()]
    return (hooks, [(n, p.requires_grad) for n, p in model.named_parameters()], model.config._attn_implementation,
            sorted(model._modules), getattr(model.config, "dept_fast", None), sorted(vars(model)))


class ShiftedEmbedding(nn.Embedding):
    """An embedding module that adds a constant to its rows: not a scale of its weight."""

    def forward(self, ids):
        return super().forward(ids) + 0.5


def with_shifted_embedding():
    model = tiny_gpt2()
    shifted = ShiftedEmbedding(VOCAB, 40)
    shifted.weight = model.transformer.wte.weight
    model.transformer.wte = shifted
    return model


class BypassedHead(GPT2LMHeadModel):
    """Given token ids, its logits come from the embeddings alone (the stack is bypassed); given
    inputs_embeds, from the stack."""

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        out = super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
        if input_ids is not None:
            out.logits = self.lm_head(self.transformer.wte(input_ids))
        return out


class LayersCalledDirectly(LlamaForCausalLM):
    """Runs its decoder layers itself, passing them none of the call's keyword arguments."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        hidden = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        rotary = self.model.rotary_emb(hidden, torch.arange(hidden.shape[1])[None])
        for layer in self.model.layers:
            hidden = layer(hidden, position_embeddings=rotary)
        return CausalLMOutputWithPast(logits=self.lm_head(self.model.norm(hidden)))


def test_an_embedding_that_is_not_a_scale_of_its_weight_is_refused():
    model = with_shifted_embedding()
    before = state(model)
    with pytest.raises(ValueError, match="ShiftedEmbedding's output is not its weight's rows times one scale"):
        apply_dept(model, 3, 4, 16)
    assert state(model) == before


def test_a_head_that_bypasses_the_stack_is_refused():
    model = BypassedHead(tiny_gpt2().config).eval()
    before = state(model)
    for share in (None, False):
        with pytest.raises(ValueError, match="BypassedHead: with a DePT adapter at its identity"):
            apply_dept(model, 3, 4, 16, share_prompt=share)
        assert state(model) == before


def test_layers_that_take_no_call_arguments_are_refused_for_prefixes():
    model = LayersCalledDirectly(tiny_llama().config).eval()
    before = state(model)
    with pytest.raises(TypeError, match="does not pass forward keyword arguments down to its attention layers"):
        apply_prefix_tuning(model, 3)
    assert state(model) == before


def test_a_shared_prompt_the_check_refuses_falls_back_to_every_row(monkeypatch):
    """share_prompt=None: a shared route that does not verify leaves the prompt in every row, exactly."""
    from dept_fast.hf import shared_prompt

    original = shared_prompt.SharedPrompts.input_kwargs

    def off_by_one(self, model, kwargs, rows, shift_positions):  # a broken shared route: positions not moved
        return original(self, model, kwargs, rows, shift_positions=False)

    monkeypatch.setattr(shared_prompt.SharedPrompts, "input_kwargs", off_by_one)
    model = apply_dept(tiny_llama(), 3, 4, 16)
    assert not model.dept.share_prompt and model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="does not give the logits of the plain model fed"):
        apply_dept(tiny_llama(), 3, 4, 16, share_prompt=True)


def test_the_check_draws_no_random_numbers():
    """apply_dept draws what building its adapter draws (the prompt's ids, A's initialisation), no more."""
    model, other = tiny_gpt2(), tiny_gpt2()
    torch.manual_seed(1)
    apply_dept(model, 3, 4, 16)
    after_apply = torch.rand(3)
    torch.manual_seed(1)
    FusedDePTEmbedding(other.get_input_embeddings(), 3, 4, 16)
    assert torch.equal(after_apply, torch.rand(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_embedding_scales_are_derived_from_the_modules_output(dtype):
    gemma = tiny_gemma().to(dtype)
    scale = embedding_scale(gemma.get_input_embeddings())
    assert scale == torch.tensor(32 ** 0.5, dtype=dtype).item()  # Gemma casts its sqrt(hidden) to its dtype
    bart = build("bart").to(dtype)
    assert embedding_scale(bart.get_input_embeddings()) == torch.tensor(32 ** 0.5, dtype=torch.float32).item()
    assert embedding_scale(tiny_gpt2().to(dtype).get_input_embeddings()) == 1.0
