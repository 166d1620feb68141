"""The prefix attention around every AttentionInterface implementation it can wrap
(dept_fast/hf/attention.py), against the same adapters on the sdpa model, and the refusals.

* a FlashAttention-kind kernel registered by name: on CPU a PyTorch stand-in with FlashAttention's
  semantics (a (b, k) padding mask or None, causality from ``is_causal`` aligned to the bottom-right
  corner among each row's real keys, padded query rows zero), registered with transformers' flash
  mask function, as hub kernels are; the real ``flash_attention_2`` on CUDA (gpu);
* a kernel registered with the sdpa mask function: it gets a materialised mask;
* ``flex_attention``: forward only (its backward fails on CPU for the plain model too), one compile;
* refusals: no mask function (paged attention), a mask function of no known kind, a FlashAttention
  kernel that does not load, one that aligns causality top-left; the model is left as it was.

A mixed batch (tests/test_mixed_batches.py's adapters: shared DePT prompts of two lengths, prompt
tuning, Prefix-Tuning, a plain row, left padding) covers per-row prefix slots and padding at once.
Tolerance: the same fp32 math in another kernel (summation order only): TOL[float32].
"""
import pytest
import torch
from torch import nn

from dept_fast import apply_dept, apply_prefix_tuning
from dept_fast.hf import attention
from dept_fast.hf.attention import PREFIX_SLOT_ATTR, prefix_name, wrapped_implementation
from dept_models import randomized
from families import build
from numerics import TOL, rel_err
from tiny_models import VOCAB

NAMES = ["dept", "pt", "__base__", "prefix", "dept", "small"]
STAND_IN = "test_varlen_attention"


def mixed(implementation: str, seed: int = 0) -> nn.Module:
    """The tiny GQA Llama on ``implementation`` (dropout off, train mode) with four adapters: shared
    DePT prompts (m 3 and m 2), prompt tuning (m 5), Prefix-Tuning (p 4); every weight drawn at random."""
    torch.manual_seed(seed)
    model = build("llama-gqa", attn_implementation=implementation)
    apply_dept(model, 3, 4, 16, adapter_name="dept")
    apply_dept(model, 5, 0, 16, adapter_name="pt")
    apply_dept(model, 2, 2, 12, lora_alpha=3.0, adapter_name="small")
    apply_prefix_tuning(model, 4, projection_dim=None, adapter_name="prefix")
    assert model.dept.share_prompt
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    model.generation_config.eos_token_id = None
    return model.train()


def batch(rows: int = len(NAMES), length: int = 7, padded: bool = True) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (rows, length), generator=gen)
    if not padded:
        return dict(input_ids=ids, labels=ids)
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[3, :1] = 0
    return dict(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def step(model: nn.Module, inputs: dict, names=None, backward: bool = True, call=None):
    """Logits, loss and gradients of ``model`` (called through ``call``, e.g. its compiled form)."""
    out = (model if call is None else call)(**inputs, **({} if names is None else dict(adapter_names=names)))
    if not backward:
        return out.logits.detach(), out.loss.detach(), {}
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad()
    return out.logits.detach(), out.loss.detach(), grads


def assert_same(got, want, real: torch.Tensor) -> None:
    (logits, loss, grads), (want_logits, want_loss, want_grads) = got, want
    assert rel_err(logits[real], want_logits[real]) <= TOL[torch.float32]
    assert rel_err(loss, want_loss) <= TOL[torch.float32]
    assert set(grads) == set(want_grads)
    for name, grad in grads.items():
        assert rel_err(grad, want_grads[name]) <= TOL[torch.float32], name


def real_positions(inputs: dict) -> torch.Tensor:
    mask = inputs.get("attention_mask")
    return torch.ones_like(inputs["input_ids"], dtype=torch.bool) if mask is None else mask.bool()


# ---------------------------------------------------------------------------------------------
# A FlashAttention-kind kernel registered by name

def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, is_causal=None,
                     **kwargs):
    """FlashAttention's semantics (transformers' ``flash_attention_forward``: unpad by the (b, k) mask,
    the queries by its last q columns, causal bottom-right among each row's real keys) in PyTorch."""
    assert module.config._attn_implementation == STAND_IN  # the module as a kernel expects to see it
    assert attention_mask is None or attention_mask.dim() == 2, "a FlashAttention kernel takes no 4-D mask"
    varlen_attention.masks.append(attention_mask)
    batch, heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    groups = heads // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    keys = (torch.ones(batch, k_len, dtype=torch.bool, device=query.device) if attention_mask is None
            else attention_mask.bool())
    queries = keys[:, -q_len:]
    allowed = keys[:, None, :].expand(batch, q_len, k_len)
    if (module.is_causal if is_causal is None else is_causal):
        key_rank, query_rank = keys.long().cumsum(-1) - 1, queries.long().cumsum(-1) - 1
        shift = (keys.sum(-1) - queries.sum(-1))[:, None, None]
        allowed = allowed & (key_rank[:, None, :] <= query_rank[:, :, None] + shift)
    scores = (query @ key.transpose(-1, -2)) * (head_dim ** -0.5 if scaling is None else scaling)
    probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
    out = (probs @ value) * queries[:, None, :, None]
    return out.transpose(1, 2).contiguous(), None


varlen_attention.masks = []


@pytest.fixture
def stand_in(monkeypatch):
    """The stand-in registered with transformers under :data:`STAND_IN` with the flash mask function,
    its kernel "loaded" (transformers would fetch a hub kernel by that name)."""
    from transformers import AttentionInterface
    from transformers import modeling_flash_attention_utils as fa
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(STAND_IN, varlen_attention)
    AttentionMaskInterface.register(STAND_IN, flash_attention_mask)
    monkeypatch.setattr(fa, "lazy_import_flash_attention", lambda implementation, *args, **kwargs: None)
    varlen_attention.masks.clear()
    yield STAND_IN
    name = prefix_name(STAND_IN)
    for mapping in (AttentionInterface._global_mapping, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping):
        mapping.pop(STAND_IN, None)
        mapping.pop(name, None)
    attention.ATTENTION_NAMES.pop(STAND_IN, None)
    attention.MASK_KINDS.pop(STAND_IN, None)


def test_the_stand_in_is_the_sdpa_model_without_adapters(stand_in):
    torch.manual_seed(0)
    plain, reference = build("llama-gqa", attn_implementation=stand_in), build("llama-gqa")
    inputs = batch()
    real = real_positions(inputs)
    assert rel_err(plain(**inputs).logits[real], reference(**inputs).logits[real]) <= TOL[torch.float32]


@pytest.mark.parametrize("case", ["mixed-padded", "shared-unpadded", "prefix-unpadded", "shared-padded"])
def test_flash_kind_kernel_matches_sdpa(stand_in, case):
    """Mixed and uniform batches through the FlashAttention-kind kernel: logits, loss, every gradient
    as on sdpa; the kernel gets (b, p + k) padding masks, or None for an unpadded uniform batch."""
    model, reference = mixed(stand_in), mixed("sdpa")
    assert model.config._attn_implementation == prefix_name(stand_in) and "flash" not in prefix_name(stand_in)
    assert wrapped_implementation(model.config._attn_implementation) == stand_in
    inputs = batch(padded=case.endswith("-padded"))
    names = {"mixed-padded": NAMES, "shared-unpadded": None, "prefix-unpadded": ["prefix"] * len(NAMES),
             "shared-padded": ["dept", "small"] * 3}[case]
    varlen_attention.masks.clear()
    assert_same(step(model, inputs, names), step(reference, inputs, names), real_positions(inputs))
    with_prefix = [m for m in varlen_attention.masks if m is None or m.shape[1] > 7]
    assert with_prefix
    if case.endswith("-unpadded"):
        assert all(m is None for m in with_prefix)


def test_flash_kind_kernel_generates_as_sdpa(stand_in):
    model, reference = mixed(stand_in).eval(), mixed("sdpa").eval()
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    kwargs = dict(adapter_names=NAMES, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(**inputs, **kwargs), reference.generate(**inputs, **kwargs))


@pytest.mark.parametrize("names", [None, ["prefix"] * len(NAMES)], ids=["shared", "prefix"])
def test_flash_kind_kernel_under_torch_compile(stand_in, names):
    """torch.compile(fullgraph=True, aot_eager) through the FlashAttention-kind route (the module and
    config views the kernel reads, traced by Dynamo): eager's numbers. Unpadded: transformers' flash
    mask function reads a padding mask's values on the host (``attention_mask.all()``), a graph break
    for the plain model too."""
    torch._dynamo.reset()
    model = mixed(stand_in)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    inputs = batch(padded=False)
    assert_same(step(model, inputs, names, call=compiled), step(model, inputs, names), real_positions(inputs))


def test_kernel_with_the_sdpa_mask_function_gets_a_materialised_mask(monkeypatch):
    """A kernel registered with transformers' sdpa mask function: what None would mean to it is
    unknown, so its masks are always materialised (its causal batches too)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    masks = []

    def kernel(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    name = "test_sdpa_like_kernel"
    AttentionInterface.register(name, kernel)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    try:
        model, reference = mixed(name), mixed("sdpa")
        masks.clear()  # the attach's self-check ran the plain model
        inputs = batch(padded=False)
        assert_same(step(model, inputs), step(reference, inputs), real_positions(inputs))
        assert masks and all(isinstance(mask, torch.Tensor) for mask in masks)
    finally:
        for mapping in (AttentionInterface._global_mapping, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping):
            mapping.pop(name, None)
            mapping.pop(prefix_name(name), None)
        attention.ATTENTION_NAMES.pop(name, None)
        attention.MASK_KINDS.pop(name, None)


def test_flex_attention_forward():
    """flex_attention, forward only and one pass (each new shape compiles flex's kernel on CPU, tens of
    seconds): two prefix adapters of different lengths and a plain row in a left-padded batch give
    the sdpa model's logits and loss; the prefix joins flex's BlockMask (padding, per-row slots)."""
    def model_on(implementation):
        torch.manual_seed(0)
        model = build("llama-gqa", attn_implementation=implementation)
        apply_prefix_tuning(model, 4, projection_dim=None, adapter_name="long")
        apply_prefix_tuning(model, 2, projection_dim=None, adapter_name="short")
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.prefix_adapters.parameters():
                p.normal_(0, 0.5)
        return model.eval()

    model, reference = model_on("flex_attention"), model_on("sdpa")
    assert model.config._attn_implementation == "dept_prefix_flex_attention"
    inputs = batch(rows=4)
    names = ["long", "short", "__base__", "short"]
    with torch.no_grad():
        got, want = step(model, inputs, names, backward=False), step(reference, inputs, names, backward=False)
    assert_same(got, want, real_positions(inputs))


# ---------------------------------------------------------------------------------------------
# Refusals

def assert_refused(implementation: str, match: str) -> None:
    """apply_prefix_tuning and apply_dept(share_prompt=True) refuse, naming why; the model stays on
    its attention, no layer tagged."""
    for attach in (lambda m: apply_prefix_tuning(m, 3), lambda m: apply_dept(m, 3, 4, 16, share_prompt=True)):
        model = build("gpt2")
        model.config._attn_implementation_internal = implementation
        with pytest.raises(ValueError, match=match):
            attach(model)
        assert model.config._attn_implementation == implementation
        assert not any(hasattr(m, PREFIX_SLOT_ATTR) for m in model.modules())


def test_paged_attention_is_refused():
    assert_refused("paged|eager", r"'paged\|eager': it has no mask function .* paged attention reads keys and values")


def test_kernel_with_a_mask_function_of_no_known_kind_is_refused():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    def own_mask(*args, **kwargs):
        return None

    name = "test_own_mask_kernel"
    AttentionInterface.register(name, sdpa_attention_forward)
    AttentionMaskInterface.register(name, own_mask)
    try:
        assert_refused(name, r"its mask function .*own_mask.* is none of transformers' sdpa, eager, flash or flex")
    finally:
        AttentionInterface._global_mapping.pop(name)
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop(name)


def test_flash_kernel_that_does_not_load_is_refused(monkeypatch):
    from transformers import modeling_flash_attention_utils as fa

    def missing(implementation, *args, **kwargs):
        raise ImportError("flash_attn is not installed")

    monkeypatch.setattr(fa, "lazy_import_flash_attention", missing)
    assert_refused("flash_attention_2", r"'flash_attention_2': its kernel does not load here \(ImportError: flash_attn")


def test_flash_with_top_left_causal_alignment_is_refused(monkeypatch):
    from transformers import modeling_flash_attention_utils as fa

    monkeypatch.setattr(fa, "flash_attn_supports_top_left_mask", lambda: True)
    assert_refused("flash_attention_3", r"aligns causal masks to the top-left corner .* lose sight of its last p own")


def test_names_are_ones_transformers_takes_as_they_are():
    """No "flash" (transformers would load a kernel by our name) and no "/" (a hub kernel)."""
    assert prefix_name("sdpa") == "dept_prefix" and prefix_name("eager") == "dept_prefix_eager"
    assert prefix_name("flex_attention") == "dept_prefix_flex_attention"
    for inner in ("flash_attention_2", "kernels-community/flash-attn2", "kernels-community/vllm-flash-attn3:v1"):
        name = prefix_name(inner)
        assert "flash" not in name and "/" not in name and ":" not in name and name.startswith("dept_prefix_")


# ---------------------------------------------------------------------------------------------
# CUDA

@pytest.mark.gpu
@pytest.mark.parametrize("case", ["mixed-padded", "shared-unpadded", "prefix-unpadded"])
def test_flash_attention_2_matches_sdpa_on_cuda(case):
    """The real flash_attention_2 kernel (bf16, head_dim 16): a step as on sdpa within bf16 rounding
    (inputs of each attention rounded to bf16, the outputs once more: 4 x TOL[bf16])."""
    pytest.importorskip("flash_attn")
    from transformers import LlamaConfig, LlamaForCausalLM

    def model_on(implementation):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                             attn_implementation=implementation)
        model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
        apply_dept(model, 3, 4, 16, adapter_name="dept")
        apply_dept(model, 2, 2, 12, adapter_name="small")
        apply_prefix_tuning(model, 4, projection_dim=None, adapter_name="prefix")
        return randomized(model, seed=1).train()

    model, reference = model_on("flash_attention_2"), model_on("sdpa")
    inputs = {k: v.cuda() for k, v in batch(rows=4, padded=case.endswith("-padded")).items()}
    names = {"mixed-padded": ["dept", "__base__", "prefix", "small"], "shared-unpadded": None,
             "prefix-unpadded": ["prefix"] * 4}[case]
    got, want = step(model, inputs, names), step(reference, inputs, names)
    real = real_positions(inputs)
    assert rel_err(got[0][real].float(), want[0][real].float()) <= 4 * TOL[torch.bfloat16]
    assert rel_err(got[1].float(), want[1].float()) <= 4 * TOL[torch.bfloat16]
