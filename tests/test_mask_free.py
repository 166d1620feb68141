"""The prefix attention's mask-free fast path and its masks joined once per forward
(dept_fast/hf/attention.py), on the family matrix (tests/families.py): what sdpa receives
(intercepted), exactness against the materialised-mask path (logits, loss, every gradient),
how often a padded batch's mask is joined, T5 (no mask-free form: its position bias is an additive
tensor), and FlashAttention under sdpa on CUDA.

Tolerance: the two paths compute the same softmax over the same keys in fp32, the mask-free one
through sdpa's causal kernel over front-padded queries, the other through a boolean mask, so they
differ only in the summation order inside each attention (sums of at most p + L < 30 terms, dot
products of head_dim <= 12): fp32 reduction-order noise, TOL[float32].
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dept_fast import apply_dept, apply_prefix_tuning, enable_activation_checkpointing
from dept_fast.hf import attention
from dept_fast.hf.attention import PREFIX_CROSS_ATTR, PREFIX_SLOT_ATTR
from dept_models import M, R, S, padded_batch
from families import DECODERS, FAMILIES, LAYOUTS, build
from numerics import TOL, rel_err
from tiny_models import VOCAB

KINDS = ["shared-prompt", "prefix"]
P = 3  # prefix length


def adapted(family: str, kind: str, **overrides) -> nn.Module:
    """The family's tiny model (dropout off) in train mode with a shared DePT prompt (B non-zero) or
    prefixes (through their MLP)."""
    torch.manual_seed(4)
    model = build(family, dropout=False, **overrides)
    if kind == "prefix":
        return apply_prefix_tuning(model, P, projection_dim=16).train()
    model = apply_dept(model, M, R, S)
    assert model.dept.share_prompt
    with torch.no_grad():
        model.dept.lora_B.normal_()
    return model.train()


def unpadded(model: nn.Module, rows: int = 3, length: int = 7, with_mask: bool = False) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (rows, length), generator=gen)
    batch = dict(input_ids=ids, labels=ids)
    if model.config.is_encoder_decoder:
        batch["labels"] = torch.randint(3, VOCAB, (rows, 5), generator=gen)
    if with_mask:  # all ones: transformers' sdpa mask function gives None for it
        batch["attention_mask"] = torch.ones_like(ids)
    return batch


def left_padded(model: nn.Module) -> dict:
    ids, mask = padded_batch([7, 5, 6], 7, "left")
    labels = torch.randint(3, VOCAB, (3, 5)) if model.config.is_encoder_decoder else ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def step(model: nn.Module, batch: dict):
    """Logits, loss and the trainable parameters' gradients of one forward + backward."""
    out = model(**batch)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out.logits.detach(), out.loss.detach(), grads


@pytest.fixture
def sdpa_masks(monkeypatch):
    """Every ``F.scaled_dot_product_attention`` call's (attn_mask, is_causal, query length)."""
    calls = []
    original = F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append((attn_mask, is_causal, query.shape[2]))
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


@pytest.fixture
def joins(monkeypatch):
    """Every mask :func:`attention.join_mask` built (the layers that reuse one are not counted)."""
    built = []
    original = attention.join_mask

    def counting(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(attention, "join_mask", counting)
    return built


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "all-ones-mask"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", DECODERS)
def test_unpadded_passes_reach_sdpa_without_a_mask(family, kind, with_mask, sdpa_masks, joins):
    """Forward and backward of an unpadded batch: no sdpa call (prompt pass, input pass) gets a mask
    tensor, every one is causal, and no mask is joined."""
    model = adapted(family, kind)
    sdpa_masks.clear(), joins.clear()  # the attach's self-check ran the model
    step(model, unpadded(model, with_mask=with_mask))
    layers = model.config.num_hidden_layers
    assert len(sdpa_masks) == layers * (2 if kind == "shared-prompt" else 1)
    assert all(mask is None and causal for mask, causal, _ in sdpa_masks), sdpa_masks
    assert {q_len for _, _, q_len in sdpa_masks} == ({M, 7 + M} if kind == "shared-prompt" else {7 + P})
    assert joins == []


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", DECODERS)
def test_mask_free_equals_the_materialised_path(family, kind, monkeypatch, sdpa_masks):
    """Logits, loss and every gradient of the mask-free path against the same model with the path
    switched off (a boolean mask over [prefix ; own keys] in every layer)."""
    model = adapted(family, kind)
    batch = unpadded(model)
    sdpa_masks.clear()  # the attach's self-check ran the model
    fast = step(model, batch)
    assert all(mask is None for mask, _, _ in sdpa_masks)
    monkeypatch.setattr(attention, "mask_free", lambda *args: False)
    sdpa_masks.clear()
    materialised = step(model, batch)
    input_pass = [mask for mask, _, q_len in sdpa_masks if q_len == 7]
    assert input_pass and all(isinstance(mask, torch.Tensor) and mask.dtype == torch.bool for mask in input_pass)
    (logits, loss, grads), (want_logits, want_loss, want_grads) = fast, materialised
    assert rel_err(logits, want_logits) <= TOL[torch.float32]
    assert rel_err(loss, want_loss) <= TOL[torch.float32]
    assert set(grads) == set(want_grads) and grads
    for name, grad in grads.items():
        assert grad.abs().sum() > 0 and rel_err(grad, want_grads[name]) <= TOL[torch.float32], name


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("family, kind", [(family, kind) for family in FAMILIES for kind in KINDS
                                          if family in DECODERS or kind == "prefix"])  # T5: no shared prompt
def test_padded_batch_joins_its_mask_once_per_forward(family, kind, checkpointing, joins):
    """A left-padded batch's mask is joined with the prefix columns by the first layer and shared by
    the others (one mask object per attention group, also through checkpointing's recomputation)."""
    model = adapted(family, kind)
    joins.clear()  # the attach's self-check ran the model
    if checkpointing:
        enable_activation_checkpointing(model, use_reentrant=False)
    received = {}
    original = attention.call_inner

    def recording(inner, module, query, key, value, attention_mask, **kwargs):
        tagged = hasattr(module, PREFIX_SLOT_ATTR) or hasattr(module, PREFIX_CROSS_ATTR)
        if tagged and key.shape[2] > query.shape[2]:  # with a prefix joined
            received.setdefault(id(module), []).append(attention_mask)
        return original(inner, module, query, key, value, attention_mask, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "call_inner", recording)
        step(model, left_padded(model))
    assert len(joins) == len(LAYOUTS[family]), [type(j) for j in joins]  # T5: encoder, decoder, cross
    assert all(isinstance(mask, torch.Tensor) for mask in joins)
    assert len(received) == sum(layers for layers, _, _ in LAYOUTS[family].values())
    assert all(any(mask is joined for joined in joins) for masks in received.values() for mask in masks)


def test_t5_keeps_a_mask_tensor():
    """T5 has no mask-free form: its position bias is an additive (b, heads, q, k) tensor, so sdpa
    needs a mask tensor anyway; an unpadded T5 batch gets the joined mask (one per stack)."""
    model = adapted("t5", "prefix")
    calls = []
    original = attention.call_inner

    def recording(inner, module, query, key, value, attention_mask, **kwargs):
        if hasattr(module, PREFIX_SLOT_ATTR):
            calls.append((attention_mask, kwargs.get("position_bias")))
        return original(inner, module, query, key, value, attention_mask, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "call_inner", recording)
        step(model, unpadded(model))
    assert calls and all(bias is not None and bias.shape[-1] == mask.shape[-1] for mask, bias in calls
                         if mask is not None)
    assert any(isinstance(mask, torch.Tensor) for mask, _ in calls)  # the decoder's causal self-attention


def gpu_llama(**overrides):
    """A 2-layer GQA Llama whose head_dim (16) the flash kernel takes, bf16 on CUDA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, **overrides)
    return LlamaForCausalLM(config).to("cuda", torch.bfloat16).train()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_flash_backend_runs_unpadded_steps(kind):
    """Under sdpa_kernel([FLASH_ATTENTION]) sdpa may not fall back to another kernel: an unpadded
    shared-prompt step and a prefix step run (a mask would make it raise)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = gpu_llama()
    model = (apply_prefix_tuning(model, 8, projection_dim=32) if kind == "prefix" else apply_dept(model, 8, 4, 64))
    model.train()
    ids = torch.randint(3, VOCAB, (4, 48), device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(out.loss) and grads and all(g is not None and torch.isfinite(g).all() for g in grads)
