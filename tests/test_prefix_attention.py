"""The registered prefix attention function on its own, against the fp32 reference: GQA, padding
masks, causal masks with and without a cache, decoding, per-row prefix slots (mixed batches), the
mask-free form, T5's position bias, sdpa and eager; capture, pass-through of untagged modules, the
reentrant guard, positions."""
import functools
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dept_fast import enable_activation_checkpointing
from dept_fast.hf.attach import forward_arguments, prefix_pass
from dept_fast.hf.attention import PREFIX_SLOT_ATTR, PrefixKV, prefix_attention_forward
from dept_fast.hf.route import use_non_reentrant_checkpointing
from dept_fast.ops import prefix_attention_reference
from numerics import TOL, rel_err
from tiny_models import tiny_llama, tiny_t5


def llama_attention():
    """LlamaAttention of the tiny model: 4 query heads, 2 key/value heads of 12, causal."""
    module = tiny_llama().model.layers[0].self_attn
    setattr(module, PREFIX_SLOT_ATTR, 0)
    return module


def t5_encoder_attention():
    module = tiny_t5().encoder.block[0].layer[0].SelfAttention
    setattr(module, PREFIX_SLOT_ATTR, 0)
    return module


def qkv(batch, heads, kv_heads, q_len, kv_len, head_dim, n_prefix, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = functools.partial(torch.randn, generator=gen)
    return (rand(batch, heads, q_len, head_dim), rand(batch, kv_heads, kv_len, head_dim),
            rand(batch, kv_heads, kv_len, head_dim), rand(1, kv_heads, n_prefix, head_dim),
            rand(1, kv_heads, n_prefix, head_dim))


def padding_mask(batch, q_len, kv_len, causal):
    """Row 0 left-padded by 2, other rows unpadded, as transformers' sdpa mask builds it."""
    keep = torch.ones(batch, kv_len, dtype=torch.bool)
    keep[0, :2] = False
    mask = keep[:, None, None, :].expand(batch, 1, q_len, kv_len)
    if causal:
        mask = mask & (torch.arange(kv_len) <= torch.arange(q_len)[:, None] + kv_len - q_len)
    return mask


CASES = {  # (q_len, kv_len, mask kind): kv_len > q_len is a step after a cache of kv_len - q_len tokens
    "padded-causal": (6, 6, "padding"),
    "no-mask-causal": (6, 6, None),
    "cached-chunk-no-mask": (3, 7, None),
    "decode-step-padded": (1, 7, "padding"),
}


@pytest.mark.parametrize("inner", ["sdpa", "eager"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_gqa_causal_matches_reference(case, inner):
    q_len, kv_len, mask_kind = case
    module = llama_attention()
    query, key, value, prefix_key, prefix_value = qkv(3, 4, 2, q_len, kv_len, 12, n_prefix=5)
    mask = padding_mask(3, q_len, kv_len, causal=True) if mask_kind else None
    out, _ = prefix_attention_forward(module, query, key, value, mask, scaling=module.scaling,
                                      dept_prefix=PrefixKV([(prefix_key, prefix_value)]), inner=inner)
    ref = prefix_attention_reference(query, key, value, prefix_key, prefix_value, mask, module.scaling, causal=True)
    assert out.shape == (3, q_len, 4, 12)
    assert rel_err(out, ref) <= TOL[torch.float32]


@pytest.mark.parametrize("inner", ["sdpa", "eager"])
@pytest.mark.parametrize("mask_kind", ["padding", None], ids=["padded", "no-mask"])
def test_per_row_prefix_slots_match_reference(mask_kind, inner):
    """A mixed batch: two prefix sources, the second's last 2 slots padding (``valid``), row 2 on no
    source (-1); against the reference with each row's valid slots."""
    module = llama_attention()
    query, key, value, prefix_key, prefix_value = qkv(3, 4, 2, 6, 6, 12, n_prefix=5)
    sources = (torch.cat([prefix_key, prefix_key.flip(2)]), torch.cat([prefix_value, prefix_value.flip(2)]))
    valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    source = torch.tensor([1, 0, -1])
    mask = padding_mask(3, 6, 6, causal=True) if mask_kind else None
    spec = PrefixKV([sources], source=source, valid=valid)
    out, _ = prefix_attention_forward(module, query, key, value, mask, scaling=module.scaling, dept_prefix=spec,
                                      inner=inner)
    rows = source.clamp_min(0)
    ref = prefix_attention_reference(query, key, value, sources[0][rows], sources[1][rows], mask, module.scaling,
                                     causal=True, prefix_valid=spec.row_valid(3))
    assert rel_err(out, ref) <= TOL[torch.float32]


def test_no_mask_reaches_sdpa_for_an_unpadded_causal_layer(monkeypatch):
    """The mask-free form: sdpa gets is_causal and no mask over queries padded at the front."""
    seen = []
    original = F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, is_causal=False, **kwargs):
        seen.append((attn_mask, is_causal, query.shape[2], key.shape[2]))
        return original(query, key, value, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    module = llama_attention()
    query, key, value, prefix_key, prefix_value = qkv(3, 4, 2, 6, 6, 12, n_prefix=5)
    out, _ = prefix_attention_forward(module, query, key, value, None, scaling=module.scaling,
                                      dept_prefix=PrefixKV([(prefix_key, prefix_value)]))
    assert seen == [(None, True, 11, 11)]
    ref = prefix_attention_reference(query, key, value, prefix_key, prefix_value, None, module.scaling, causal=True)
    assert out.shape == (3, 6, 4, 12) and rel_err(out, ref) <= TOL[torch.float32]


@pytest.mark.parametrize("inner", ["sdpa", "eager"])
def test_t5_position_bias_and_padding(inner):
    """T5's relative position bias covers the own keys; the prefix columns get none."""
    module = t5_encoder_attention()
    query, key, value, prefix_key, prefix_value = qkv(2, 4, 4, 6, 6, 10, n_prefix=3)
    bias = module.compute_bias(6, 6)
    mask = padding_mask(2, 6, 6, causal=False)
    out, _ = prefix_attention_forward(module, query, key, value, mask, scaling=1.0, position_bias=bias,
                                      dept_prefix=PrefixKV([(prefix_key, prefix_value)]), inner=inner)
    ref = prefix_attention_reference(query, key, value, prefix_key, prefix_value, mask, 1.0, position_bias=bias)
    assert rel_err(out, ref) <= TOL[torch.float32]


def test_batch_rows_of_the_prefix_and_low_precision():
    """A prefix given per batch row is used as is; an fp32 prefix meets bf16 activations in bf16."""
    module = llama_attention()
    query, key, value, prefix_key, prefix_value = qkv(2, 4, 2, 5, 5, 12, n_prefix=4)
    prefix_key, prefix_value = prefix_key.repeat(2, 1, 1, 1), prefix_value.repeat(2, 1, 1, 1)
    prefix_key[1] += 1.0
    out, _ = prefix_attention_forward(module, *(t.bfloat16() for t in (query, key, value)), None,
                                      scaling=module.scaling, dept_prefix=PrefixKV([(prefix_key, prefix_value)]))
    ref = prefix_attention_reference(query, key, value, prefix_key, prefix_value, None, module.scaling, causal=True)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) <= 4 * TOL[torch.bfloat16]  # q, k, v each rounded to bf16, then the output


def test_capture_and_untagged_modules_pass_through():
    """Tagged modules record their own K/V (before the prefix is joined); a module without a slot
    (e.g. T5 cross-attention) runs the wrapped implementation untouched."""
    module = llama_attention()
    query, key, value, prefix_key, prefix_value = qkv(2, 4, 2, 5, 5, 12, n_prefix=4)
    captured = {}
    prefix_attention_forward(module, query, key, value, None, scaling=module.scaling,
                             dept_prefix=PrefixKV([(prefix_key, prefix_value)], capture=captured))
    assert captured[0][0] is key and captured[0][1] is value

    delattr(module, PREFIX_SLOT_ATTR)
    out, _ = prefix_attention_forward(module, query, key, value, None, scaling=module.scaling,
                                      dept_prefix=PrefixKV([(prefix_key, prefix_value)], capture=captured))
    plain = F.scaled_dot_product_attention(query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1),
                                           is_causal=True, scale=module.scaling).transpose(1, 2)
    assert rel_err(out, plain) <= TOL[torch.float32]


def test_reentrant_checkpoint_is_refused():
    """Recording on when the pass began, off inside the attention (a reentrant checkpoint), and a
    prefix that needs a gradient: refused, never a silently wrong gradient."""
    module = llama_attention()
    query, key, value, prefix_key, prefix_value = qkv(1, 4, 2, 3, 3, 12, n_prefix=2)
    spec = PrefixKV([(prefix_key.requires_grad_(), prefix_value)], grad_enabled=True)

    def layer(q, spec=spec):
        return prefix_attention_forward(module, q, key, value, None, dept_prefix=spec)[0]

    with pytest.raises(RuntimeError, match="reentrant"):
        checkpoint(layer, query.requires_grad_(), use_reentrant=True)
    assert checkpoint(layer, query, use_reentrant=False).requires_grad
    with torch.no_grad():  # a pass that began without recording (inference) has nothing to protect
        layer(query, PrefixKV(spec.key_values, grad_enabled=False))


def test_transformers_reentrant_checkpointing_is_switched_with_a_warning():
    model = tiny_llama()
    enable_activation_checkpointing(model, use_reentrant=True)
    layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    with pytest.warns(UserWarning, match="use_reentrant=False"):
        use_non_reentrant_checkpointing(layers)
    functions = [m._gradient_checkpointing_func for m in layers if m.gradient_checkpointing]
    assert functions and all(f.keywords["use_reentrant"] is False for f in functions)


def test_positions_start_after_the_prefix():
    ids = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    prefix = [(torch.zeros(1, 1, 5, 2), torch.zeros(1, 1, 5, 2))]

    def positions(**kwargs):
        return prefix_pass(kwargs, prefix)["position_ids"].tolist()

    assert positions(input_ids=ids, attention_mask=mask) == [[5, 5, 5, 6], [5, 6, 7, 8]]
    assert positions(input_ids=ids, position_ids=torch.arange(4)[None]) == [[5, 6, 7, 8], [5, 6, 7, 8]]
    # a generation step: one new token, the mask covers the 4 cached ones too
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    assert positions(input_ids=ids[:, :1], attention_mask=step_mask) == [[7], [9]]
    cache = type("Cache", (), {"get_seq_length": lambda self: 4})()
    assert positions(input_ids=ids[:1, :1], cache=cache) == [[9]]
    assert positions(input_ids=ids[:1, :1], past_key_values=cache) == [[9]]  # transformers < 5.24


def test_forward_arguments_names_positional_args():
    def forward(input_ids=None, past_key_values=None, attention_mask=None, **kwargs):
        pass

    args = forward_arguments(inspect.signature(forward), ("ids", None), {"attention_mask": "m", "extra": 1})
    assert args == {"input_ids": "ids", "past_key_values": None, "attention_mask": "m", "extra": 1}
