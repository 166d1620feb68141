"""DePT and Prefix-Tuning composed with PEFT LoRA (dept_fast/hf/peft_models.py), in both orders, on the
grouped-query Llama: exact against an independent PEFT model (same weights, no dept_fast) fed
hand-built inputs; both kinds train; nothing PEFT made trainable is frozen; per-row names select the
LoRA and the DePT / prefix adapter of the same name; save and load; the refusals."""
import pytest
import torch

from dept_fast import apply_dept, apply_prefix_tuning, load_dept, unfreeze_adapters
from dept_models import randomized
from family_references import cache_kwargs, prefix_cache
from numerics import model_tol, rel_err
from tiny_models import VOCAB, tiny_llama

peft = pytest.importorskip("peft")
M, R, S, P = 3, 4, 16, 3


def lora(model, embed=False, name="default", seed=0):
    """LoRA (r 4) on q and v (and the input embeddings), B non-zero, so it changes the model."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(target_modules=["q_proj", "v_proj"] + (["embed_tokens"] if embed else []), r=4,
                             lora_alpha=8, init_lora_weights=False)
    return peft.get_peft_model(model, config, adapter_name=name)


def twin(model, embed=False):
    """An independent PEFT model with ``model``'s LoRA weights: the reference."""
    reference = lora(tiny_llama(), embed)
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if "dept" not in k and "prefix" not in k},
                              strict=False)
    return reference


def batch(rows=2, length=5, seed=3):
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


def lora_grads(model):
    return {k.split("base_model.model.", 1)[-1]: p.grad for k, p in model.named_parameters()
            if "lora_" in k and "dept" not in k and p.grad is not None}


def dept_reference(reference, adapter, ids, labels):
    """The PEFT model fed [P ; emb(ids) + scaling * (A @ B)[:L]], emb its own (LoRA) embedding module."""
    tensors = [t.detach().clone().requires_grad_(True) for t in (adapter.prompt, adapter.lora_A, adapter.lora_B)]
    rows = reference.get_base_model().get_input_embeddings()(ids) + adapter.scaling * (tensors[1][:ids.shape[1]]
                                                                                      @ tensors[2])
    embeds = torch.cat([tensors[0].expand(ids.shape[0], -1, -1), rows], 1)
    labels = torch.cat([torch.full((ids.shape[0], M), -100), labels], 1)
    return reference(inputs_embeds=embeds, labels=labels), tensors


@pytest.mark.parametrize("embed", [False, True], ids=["lora", "lora-on-embeddings"])
@pytest.mark.parametrize("share", [None, False], ids=["shared", "every-row"])
def test_lora_then_dept_equals_the_peft_model_fed_its_inputs(share, embed):
    model = lora(tiny_llama(), embed)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert apply_dept(model, M, R, S, share_prompt=share) is model
    assert trainable < {n for n, p in model.named_parameters() if p.requires_grad}  # LoRA still trains
    adapter = randomized(model.dept)
    reference = twin(model, embed)
    ids, mask = batch()
    out = model.train()(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    ref, tensors = dept_reference(reference.train(), adapter, ids, ids)
    ref.loss.backward()
    tol = model_tol(reference, ids.numel() + 2 * M, backward=True)
    assert rel_err(out.logits, ref.logits[:, M:] if adapter.share_prompt else ref.logits) <= tol
    assert rel_err(out.loss, ref.loss) <= tol
    for p, leaf in zip((adapter.prompt, adapter.lora_A, adapter.lora_B), tensors):
        assert rel_err(p.grad, leaf.grad) <= tol
    got, want = lora_grads(model), lora_grads(reference)
    assert set(got) == set(want) and len(got) == 8 + 2 * embed
    for name in want:
        assert got[name].abs().sum() > 0 and rel_err(got[name], want[name]) <= tol, name


def test_lora_then_prefix_equals_the_peft_model_with_a_prefilled_cache():
    model = apply_prefix_tuning(lora(tiny_llama()), P, projection_dim=None)
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_A.default" in n)
    encoder = randomized(model.prefix_tuning).encoders["decoder"]
    reference = twin(model)
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    key_values = [tuple(t.detach().clone().requires_grad_(True) for t in pair) for pair in encoder.key_values()]
    expanded = [(k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)) for k, v in key_values]
    ref = reference(input_ids=ids, attention_mask=torch.cat([torch.ones(2, P, dtype=mask.dtype), mask], 1), labels=ids,
                    **cache_kwargs(reference.get_base_model(), prefix_cache(expanded, reference.config)))
    ref.loss.backward()
    tol = model_tol(reference, ids.numel() + 2 * P, backward=True)
    assert rel_err(out.logits, ref.logits) <= tol and rel_err(out.loss, ref.loss) <= tol
    want = torch.stack([torch.stack([k.grad[0], v.grad[0]]) for k, v in key_values])
    assert rel_err(encoder.prefix.grad, want) <= tol
    for name, grad in lora_grads(reference).items():
        assert rel_err(lora_grads(model)[name], grad) <= tol, name


def test_dept_then_lora():
    """PEFT wraps a DePT model and freezes everything but its LoRA: the forward is exact, and
    unfreeze_adapters makes the DePT adapter train again beside LoRA."""
    inner = apply_dept(tiny_llama(), M, R, S, share_prompt=False)
    adapter = randomized(inner.dept)
    model = lora(inner)
    assert not adapter.prompt.requires_grad  # PEFT's doing
    unfreeze_adapters(model)
    assert adapter.prompt.requires_grad and adapter.lora_A.requires_grad and not adapter.weight.requires_grad
    reference = twin(model)
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    ref, tensors = dept_reference(reference, adapter, ids, ids)
    ref.loss.backward()
    tol = model_tol(reference, ids.numel() + 2 * M, backward=True)
    assert rel_err(out.logits, ref.logits) <= tol and rel_err(out.loss, ref.loss) <= tol
    for p, leaf in zip((adapter.prompt, adapter.lora_A, adapter.lora_B), tensors):
        assert rel_err(p.grad, leaf.grad) <= tol
    assert all(g.abs().sum() > 0 for g in lora_grads(model).values())


def named_stack():
    """LoRA adapters "a" and "b" (active "a"); DePT "a" (m 3, r 4), "b" and "c" (m 2, r 0, no LoRA of
    its name), every row's prompt in the sequence."""
    model = lora(tiny_llama(), name="a")
    model.add_adapter("b", peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                                           init_lora_weights=False))
    model.set_adapter("a")
    apply_dept(model, M, R, S, share_prompt=False, adapter_name="a")
    apply_dept(model, 2, 0, S, adapter_name="b")
    apply_dept(model, 2, 0, S, adapter_name="c")
    for adapter in model.dept_adapters.values():
        randomized(adapter)
    return model.eval()


def test_a_rows_name_selects_its_lora_and_its_dept_adapter():
    """Each row of one mixed batch (eval) equals the row alone with the LoRA adapter of its name (or
    the active one for "c", none for "__base__") and its DePT adapter; generate() likewise."""
    model = named_stack()
    names = ["a", "b", "c", "__base__", "b"]
    ids, mask = batch(rows=len(names), length=4)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        tokens = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=3,
                                do_sample=False, eos_token_id=None)
        for i, name in enumerate(names):
            model.set_adapter({"c": "a", "__base__": "a"}.get(name, name))  # PEFT's active LoRA for the row
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=ids[i:i + 1], adapter_names=["__base__"]).logits[0]
            else:
                alone = model(input_ids=ids[i:i + 1], **{"dept_fast_adapter_names": [name]}).logits[0]
            m = model.dept_adapters[name].num_prompt_tokens if name in model.dept_adapters else 0
            assert rel_err(logits[i, logits.shape[1] - alone.shape[0]:], alone) <= model_tol(model, 40), name
            assert m == 0 or logits.shape[1] - alone.shape[0] == M - m
        model.set_adapter("a")
        for i, name in enumerate(names):
            one = model.generate(input_ids=ids[i:i + 1], adapter_names=[name], max_new_tokens=3, do_sample=False,
                                 eos_token_id=None)
            assert torch.equal(tokens[i, -3:], one[0, -3:]), name


def test_adapters_of_both_kinds_save_and_load(tmp_path):
    model = named_stack()
    ids, mask = batch(rows=3, length=4)
    names = ["a", "b", "c"]
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    model.save_pretrained(tmp_path / "lora")
    for name, adapter in model.dept_adapters.items():
        adapter.save_pretrained(tmp_path / f"dept-{name}")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "lora" / "a"), adapter_name="a")
    loaded.load_adapter(str(tmp_path / "lora" / "b"), adapter_name="b")
    for name in names:
        load_dept(loaded, tmp_path / f"dept-{name}", share_prompt=False, adapter_name=name)
    with torch.no_grad():
        got = loaded.eval()(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    assert torch.equal(got, want)


def test_refusals_name_the_problem():
    model = named_stack()
    ids, mask = batch(rows=2, length=4)
    with pytest.raises(ValueError, match=r"unknown adapter name\(s\) \['nope'\]"):
        model(input_ids=ids, adapter_names=["a", "nope"])
    model.train()
    with pytest.raises(ValueError, match="per-row LoRA adapters .* only in eval mode"):
        model(input_ids=ids, adapter_names=["a", "b"])
    model(input_ids=ids, adapter_names=["a", "c"], labels=ids).loss.backward()  # both rows: the active LoRA "a"
    shared = lora(tiny_llama(), name="a")
    shared.add_adapter("b", peft.LoraConfig(target_modules=["q_proj"], r=2))
    apply_dept(shared, M, R, S, adapter_name="a")
    with pytest.raises(ValueError, match="do not go with a shared DePT prompt"):
        shared.eval()(input_ids=ids, adapter_names=["a", "b"])
    prompt_tuning = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                            num_virtual_tokens=4))
    with pytest.raises(ValueError, match="PEFT prompt-learning adapters"):
        apply_dept(prompt_tuning, M, R, S)
