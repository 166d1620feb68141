"""apply_prefix_tuning / load_prefix_tuning on the model families (tests/families.py): what is trained, where the
prefixes act, merge(), our checkpoint format, both wrapped attention implementations, and the
errors for models, checkpoints and arguments that cannot work."""
import json

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2LMHeadModel
from transformers.models.gpt2 import modeling_gpt2

from dept_fast import FusedPrefixEncoder, apply_prefix_tuning, load_prefix_tuning
from dept_fast.hf import route
from dept_fast.hf.attention import PREFIX_SLOT_ATTR
from dept_fast.ops import prefix_kv_reference
from families import FAMILIES, LAYOUTS, build
from numerics import TOL, rel_err
from tiny_models import VOCAB, tiny_gpt2, tiny_llama, tiny_t5


def inputs(model, rows=2):
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (rows, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    if model.config.is_encoder_decoder:
        return dict(input_ids=ids, attention_mask=mask, labels=torch.randint(3, VOCAB, (rows, 4), generator=gen))
    return dict(input_ids=ids, attention_mask=mask, labels=ids)


def adapted(name, projection_dim=16, **overrides):
    torch.manual_seed(5)
    return apply_prefix_tuning(build(name, **overrides), 3, projection_dim=projection_dim)


@pytest.mark.parametrize("name", FAMILIES)
def test_only_the_prefixes_train_and_every_layer_gets_a_gradient(name):
    model = adapted(name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("prefix_adapters.default.")}
    layouts = {stack: (e.num_layers, e.num_kv_heads, e.head_dim) for stack, e in model.prefix_tuning.encoders.items()}
    assert layouts == LAYOUTS[name]

    merged = adapted(name, projection_dim=None)
    merged(**inputs(merged)).loss.backward()
    for stack, encoder in merged.prefix_tuning.encoders.items():
        per_layer = encoder.prefix.grad.abs().flatten(1).sum(1)  # (layers,)
        assert torch.all(per_layer > 0), (stack, per_layer)


@pytest.mark.parametrize("name", FAMILIES)
def test_prefixes_change_the_output(name):
    model = adapted(name, projection_dim=None)
    batch = inputs(model)
    before = model(**batch).logits
    for stack, encoder in model.prefix_tuning.encoders.items():
        with torch.no_grad():
            encoder.prefix[-1, 1] += 1.0  # the last layer's values
        after = model(**batch).logits
        assert not torch.allclose(after, before), stack
        before = after


@pytest.mark.parametrize("name", FAMILIES)
def test_eager_and_sdpa_wrapping_agree(name):
    sdpa, eager = adapted(name), adapted(name, attn_implementation="eager")
    assert (route.route_of(sdpa).inner, route.route_of(eager).inner) == ("sdpa", "eager")
    batch = inputs(sdpa)
    assert rel_err(eager(**batch).logits, sdpa(**batch).logits) <= TOL[torch.float32]


def test_encoder_runs_the_fused_mlp():
    encoder = FusedPrefixEncoder(3, 2, 2, 12, projection_dim=16, embed_dim=48)
    expected = prefix_kv_reference(encoder.proj_in(encoder.embedding.weight), encoder.proj_out.weight,
                                   encoder.proj_out.bias, 2, 2, 12)
    assert encoder().shape == encoder.layout == (2, 2, 2, 3, 12)
    assert rel_err(encoder(), expected) <= TOL[torch.float32]
    keys, values = encoder.key_values()[1]
    assert keys.shape == (1, 2, 3, 12) and torch.equal(values[0], encoder()[1, 1])


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_merge_keeps_the_outputs(name):
    model = adapted(name)
    batch = inputs(model)
    expected = model(**batch).logits
    model.prefix_tuning.merge()
    for encoder in model.prefix_tuning.encoders.values():
        assert encoder.merged and [n for n, _ in encoder.named_parameters()] == ["prefix"]
    assert rel_err(model(**batch).logits, expected) <= TOL[torch.float32]
    assert model.prefix_tuning.merge() is model.prefix_tuning  # merging twice is a no-op


@pytest.mark.parametrize("projection_dim", [16, None], ids=["mlp", "no-mlp"])
@pytest.mark.parametrize("name", ["llama-gqa", "t5"])
def test_save_and_load_round_trip(name, projection_dim, tmp_path):
    model = adapted(name, projection_dim=projection_dim)
    model.prefix_tuning.to(torch.bfloat16)  # saved in the adapter's own dtype, here bf16 beside an fp32 model
    model.prefix_tuning.save_pretrained(tmp_path)
    stacks = json.loads((tmp_path / "dept_prefix_config.json").read_text())["stacks"]
    assert {k: (v["num_layers"], v["num_kv_heads"], v["head_dim"]) for k, v in stacks.items()} == LAYOUTS[name]
    assert all(v["projection_dim"] == projection_dim for v in stacks.values())
    loaded = load_prefix_tuning(build(name), tmp_path)
    for key, value in model.prefix_tuning.state_dict().items():
        assert torch.equal(loaded.prefix_tuning.state_dict()[key], value), key
    batch = inputs(model)
    assert rel_err(loaded(**batch).logits, model(**batch).logits) <= TOL[torch.float32]


def test_stacks_are_saved_each_as_it_is(tmp_path):
    """T5 with only the encoder's MLP merged: each stack loads back in its own form."""
    model = adapted("t5")
    model.prefix_tuning.encoders["encoder"].merge()
    model.prefix_tuning.save_pretrained(tmp_path)
    loaded = load_prefix_tuning(tiny_t5(), tmp_path)
    assert [e.merged for e in loaded.prefix_tuning.encoders.values()] == [True, False, False]
    batch = inputs(model)
    assert rel_err(loaded(**batch).logits, model(**batch).logits) <= TOL[torch.float32]


def test_models_sharing_a_config(monkeypatch):
    """transformers shares the config object between models built from it (and the switch to the
    prefix attention is made on the config): a second model wraps what the first wrapped, and a
    failed apply never switches the attention of a model already using it back."""
    config = tiny_gpt2(attn_implementation="eager").config
    first = apply_prefix_tuning(GPT2LMHeadModel(config).eval(), 3)
    batch = inputs(first)
    expected = first(**batch).logits
    assert route.route_of(apply_prefix_tuning(GPT2LMHeadModel(config), 3)).inner == "eager"

    def fail(*args, **kwargs):
        raise RuntimeError("probe failed")

    monkeypatch.setattr(route, "_tag_stacks", fail)
    with pytest.raises(RuntimeError, match="probe failed"):
        apply_prefix_tuning(GPT2LMHeadModel(config), 3)
    assert torch.equal(first(**batch).logits, expected)


# --- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix_len", [0, -2, 2.5, True])
def test_bad_prefix_len(prefix_len):
    with pytest.raises(ValueError, match="prefix_len must be a positive int"):
        apply_prefix_tuning(tiny_gpt2(), prefix_len)


def test_applying_twice_is_refused():
    model = adapted("gpt2")
    with pytest.raises(ValueError, match="already has a prefix-tuning adapter"):
        apply_prefix_tuning(model, 3)


def test_bidirectional_encoder_is_refused_and_left_as_it_was():
    model = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32))
    with pytest.raises(ValueError, match="BertModel is not a causal decoder"):
        apply_prefix_tuning(model, 3)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, PREFIX_SLOT_ATTR) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_switching_the_attention_away_is_refused():
    model = adapted("gpt2")
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="was changed to 'sdpa'; the prefix keys/values need 'dept_prefix'"):
        model(**inputs(model))


def test_attention_implementation_that_cannot_be_wrapped():
    """Paged attention has no mask function: refused, saying why (every refusal: test_attention_implementations.py)."""
    model = tiny_gpt2()
    model.config._attn_implementation_internal = "paged|eager"
    with pytest.raises(ValueError, match=r"cannot wrap attn_implementation 'paged\|eager': it has no mask function"):
        apply_prefix_tuning(model, 3)
    assert model.config._attn_implementation == "paged|eager"


def test_model_that_cannot_switch_attention(monkeypatch):
    """transformers refuses (with a log line only) to switch models that do not use AttentionInterface."""
    monkeypatch.setattr(modeling_gpt2.GPT2PreTrainedModel, "_can_set_attn_implementation",
                        classmethod(lambda cls: False))
    with pytest.raises(TypeError, match="does not route its attention through transformers' AttentionInterface"):
        apply_prefix_tuning(tiny_gpt2(), 3)


def test_attention_that_bypasses_the_interface(monkeypatch):
    def forward(self, hidden_states, *args, **kwargs):
        return self.c_proj(hidden_states), None

    monkeypatch.setattr(modeling_gpt2.GPT2Attention, "forward", forward)
    with pytest.raises(TypeError, match="never called the 'dept_prefix' attention function"):
        apply_prefix_tuning(tiny_gpt2(), 3)


def test_layers_that_drop_forward_kwargs(monkeypatch):
    original = modeling_gpt2.GPT2Attention.forward

    def forward(self, *args, **kwargs):
        kwargs.pop("dept_prefix", None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_gpt2.GPT2Attention, "forward", forward)
    with pytest.raises(TypeError, match="does not pass forward keyword arguments down"):
        apply_prefix_tuning(tiny_gpt2(), 3)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    adapted("gpt2").prefix_tuning.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"decoder prefixes \(layers, kv_heads, head_dim\) = \(2, 4, 10\) in the "
                                         r"checkpoint, \(2, 2, 12\) in the model"):
        load_prefix_tuning(tiny_llama(), tmp_path)


def test_checkpoint_with_wrong_tensors_is_refused(tmp_path):
    adapted("gpt2").prefix_tuning.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "dept_prefix_config.json").read_text())
    config["stacks"]["decoder"]["projection_dim"] = 8
    (tmp_path / "dept_prefix_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match the prefixes of its config"):
        load_prefix_tuning(tiny_gpt2(), tmp_path)


def test_unknown_directories_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_prefix_tuning(tiny_gpt2(), tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="holds neither dept_prefix_config.json"):
        load_prefix_tuning(tiny_gpt2(), tmp_path)
    (tmp_path / "dept_prefix_config.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="is not a dept_fast.prefix_tuning v1 config"):
        load_prefix_tuning(tiny_gpt2(), tmp_path)


def test_other_peft_methods_are_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    with pytest.raises(ValueError, match="peft_type 'PROMPT_TUNING'; load_prefix_tuning reads PREFIX_TUNING"):
        load_prefix_tuning(tiny_gpt2(), tmp_path)
