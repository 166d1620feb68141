"""Checkpoints: our safetensors + json round trip, the DePT authors' PROMPT_TUNING_LORA format and
PEFT PROMPT_TUNING, all written here by the tests themselves (tmp_path), and the refusals.

Tolerance: the authors' formula is recomputed here in fp32 with torch ops; the fused kernel's
fp32 sums differ in order only, so embeddings agree to ~1e-7 relative (asserted at 1e-6).
"""
import json
import math

import pytest
import torch
from torch import nn

from dept_fast import FusedDePTEmbedding, apply_dept, load_dept
from numerics import rel_err
from tiny_models import VOCAB, tiny_gpt2, tiny_t5

M, R, S = 3, 4, 16
EFFECTS = []


def trained(model):
    """Give the adapter non-trivial values, as after training (B starts at zero)."""
    with torch.no_grad():
        for p in model.dept.parameters():
            if p.requires_grad:
                p.normal_()
    return model


def inner_inputs(model):
    """Record the inputs_embeds the base model receives (decoder stack or T5 encoder)."""
    seen = []
    inner = model.get_encoder() if model.config.is_encoder_decoder else model.base_model
    inner.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["inputs_embeds"].detach()),
                                    with_kwargs=True)
    return seen


def call(model, ids):
    extra = {"decoder_input_ids": torch.zeros_like(ids[:, :2])} if model.config.is_encoder_decoder else {}
    return model(input_ids=ids, **extra).logits


@pytest.mark.parametrize("rank", [R, 0])
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_t5])
def test_save_load_round_trip_is_bit_exact(build, rank, tmp_path):
    model = trained(apply_dept(build(), M, rank, S, lora_alpha=5.0))
    model.dept.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dept_config.json", "dept_model.safetensors"]
    loaded = load_dept(build(), tmp_path)
    for name in ("prompt", "lora_A", "lora_B"):
        assert torch.equal(getattr(loaded.dept, name), getattr(model.dept, name)), name
    assert loaded.dept.scaling == model.dept.scaling and loaded.dept.max_length == S
    ids = torch.randint(3, VOCAB, (2, 6))
    assert torch.equal(call(loaded, ids), call(model, ids))


def test_module_level_round_trip_keeps_dtype(tmp_path):
    """FusedDePTEmbedding.save_pretrained / from_pretrained; fp32 adapter beside bf16 embeddings."""
    emb = nn.Embedding(VOCAB, 24).to(torch.bfloat16)
    dept = FusedDePTEmbedding(emb, M, R, S)
    dept.prompt, dept.lora_A, dept.lora_B = (nn.Parameter(torch.randn(*p.shape)) for p in dept.parameters()
                                             if p.requires_grad)
    dept.save_pretrained(tmp_path)
    back = FusedDePTEmbedding.from_pretrained(tmp_path, emb)
    for mine, theirs in zip((dept.prompt, dept.lora_A, dept.lora_B), (back.prompt, back.lora_A, back.lora_B)):
        assert theirs.dtype == torch.float32 and torch.equal(mine, theirs)
    ids = torch.randint(0, VOCAB, (2, 5))
    assert torch.equal(back(ids), dept(ids))


def write_authors_checkpoint(path, d, submodules, tensors, **config):
    """The files the DePT authors' code writes (peft_model.save_pretrained, safe_serialization=False)."""
    path.mkdir(exist_ok=True)
    fields = {"peft_type": "PROMPT_TUNING_LORA", "num_virtual_tokens": M, "num_transformer_submodules": submodules,
              "r": R, "lora_alpha": 16, "max_length": S, "token_dim": d, "save_lora_embeddings": True,
              "load_lora_embeddings": True, "load_lora_embedding_B": True, **config}
    (path / "adapter_config.json").write_text(json.dumps(fields))
    torch.save(tensors, path / "adapter_model.bin")


def authors_tensors(d, submodules):
    return {"prompt_embeddings": torch.randn(M * submodules, d),
            "prompt_encoder.lora_embedding_A": torch.randn(S, R),
            "prompt_encoder.lora_embedding_B": torch.randn(R, d)}


@pytest.mark.parametrize("build, submodules", [(tiny_gpt2, 1), (tiny_t5, 2)])
def test_authors_checkpoint_gives_their_formula(build, submodules, tmp_path):
    """E[ids] + lora_alpha / sqrt(r) * (A @ B)[:L], prompt (first m rows) prepended; and it round-trips."""
    d = build().get_input_embeddings().embedding_dim
    tensors = authors_tensors(d, submodules)
    write_authors_checkpoint(tmp_path / "authors", d, submodules, tensors)
    model = load_dept(build(), tmp_path / "authors")
    seen = inner_inputs(model)
    ids = torch.randint(3, VOCAB, (2, 7))
    logits = call(model, ids)

    E = model.get_input_embeddings().weight
    update = 16 / math.sqrt(R) * (tensors["prompt_encoder.lora_embedding_A"] @ tensors["prompt_encoder.lora_embedding_B"])
    want = torch.cat([tensors["prompt_embeddings"][:M].expand(2, -1, -1), E[ids] + update[:7]], 1)
    if model.dept.share_prompt:  # GPT-2: the prompt pass (batch 1), then the tokens
        seen = [torch.cat([seen[0].expand(2, -1, -1), seen[1]], 1)]
    assert rel_err(seen[0], want) <= 1e-6

    model.dept.save_pretrained(tmp_path / "ours")
    assert torch.equal(call(load_dept(build(), tmp_path / "ours"), ids), logits)


@pytest.mark.parametrize("present, flags, update_zero", [
    ({"A", "B"}, {"load_lora_embedding_B": False}, True),     # their loader keeps B at its zero init
    ({"A", "B"}, {"load_lora_embeddings": False}, True),
    ({"A"}, {}, True),                                        # B absent
    (set(), {"save_lora_embeddings": False}, True),           # neither saved
    ({"A", "B"}, {}, False),
])
def test_authors_optional_lora_tensors(present, flags, update_zero, tmp_path):
    emb = nn.Embedding(VOCAB, 24)
    tensors = authors_tensors(24, 1)
    for key in {"A", "B"} - present:
        del tensors[f"prompt_encoder.lora_embedding_{key}"]
    write_authors_checkpoint(tmp_path, 24, 1, tensors, **flags)
    dept = FusedDePTEmbedding.from_pretrained(tmp_path, emb)
    ids = torch.randint(0, VOCAB, (2, 5))
    assert torch.equal(dept(ids)[:, :M], tensors["prompt_embeddings"].expand(2, -1, -1))
    assert torch.equal(dept(ids)[:, M:], emb(ids)) == update_zero


def test_authors_checkpoint_with_B_but_no_A_is_refused(tmp_path):
    tensors = authors_tensors(24, 1)
    del tensors["prompt_encoder.lora_embedding_A"]
    write_authors_checkpoint(tmp_path, 24, 1, tensors)
    with pytest.raises(ValueError, match="no lora_embedding_A"):
        FusedDePTEmbedding.from_pretrained(tmp_path, nn.Embedding(VOCAB, 24))


@pytest.mark.parametrize("build, task, safe, share", [(tiny_gpt2, "CAUSAL_LM", True, None),
                                                      (tiny_gpt2, "CAUSAL_LM", False, False),
                                                      (tiny_t5, "SEQ_2_SEQ_LM", True, None)])
def test_peft_prompt_tuning_checkpoint_matches_peft(build, task, safe, share, tmp_path):
    """A checkpoint written by PEFT itself loads as rank 0 and gives PEFT's logits (of the input
    positions alone when the prompt is shared)."""
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(build(), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=M))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.normal_()
    peft_model.save_pretrained(tmp_path, safe_serialization=safe)
    if task == "SEQ_2_SEQ_LM":  # T5 has no position limit to default to
        with pytest.raises(ValueError, match="records no max_length"):
            load_dept(build(), tmp_path)
    model = load_dept(build(), tmp_path, share, max_length=None if task == "CAUSAL_LM" else 64)
    assert model.dept.share_prompt == (share is None and task == "CAUSAL_LM")
    assert model.dept.rank == 0 and model.dept.num_prompt_tokens == M
    assert model.dept.max_length == (128 - M if task == "CAUSAL_LM" else 64)  # GPT-2: n_positions - m
    ids, mask = torch.randint(3, VOCAB, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    extra = {"decoder_input_ids": torch.zeros_like(ids[:, :2])} if task == "SEQ_2_SEQ_LM" else {}
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=mask, **extra).logits
        got = model(input_ids=ids, attention_mask=mask, **extra).logits
    if model.dept.share_prompt:
        want = want[:, M:]
    assert rel_err(got, want) <= 1e-6


def _mark():
    EFFECTS.append("unpickled")


class Payload:
    def __reduce__(self):
        return _mark, ()


def test_bin_files_are_read_with_weights_only(tmp_path):
    tensors = authors_tensors(24, 1)
    tensors["extra"] = Payload()
    write_authors_checkpoint(tmp_path, 24, 1, tensors)
    with pytest.raises(ValueError, match="weights_only"):
        FusedDePTEmbedding.from_pretrained(tmp_path, nn.Embedding(VOCAB, 24))
    assert EFFECTS == []


def test_refusals_name_the_problem(tmp_path):
    emb = nn.Embedding(VOCAB, 24)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        FusedDePTEmbedding.from_pretrained(tmp_path / "nowhere", emb)
    with pytest.raises(FileNotFoundError, match="neither"):
        FusedDePTEmbedding.from_pretrained(tmp_path, emb)
    write_authors_checkpoint(tmp_path, 24, 1, authors_tensors(24, 1), peft_type="LORA")
    with pytest.raises(ValueError, match="peft_type 'LORA'"):
        FusedDePTEmbedding.from_pretrained(tmp_path, emb)
    write_authors_checkpoint(tmp_path, 24, 1, authors_tensors(24, 1))
    with pytest.raises(ValueError, match=r"prompt has shape \(3, 24\), expected \(3, 32\)"):
        FusedDePTEmbedding.from_pretrained(tmp_path, nn.Embedding(VOCAB, 32))
    with pytest.raises(ValueError, match="max_length is 16"):
        FusedDePTEmbedding.from_pretrained(tmp_path, emb, max_length=8)
    write_authors_checkpoint(tmp_path, 24, 1, {"prompt_embeddings": torch.randn(M, 24)}, peft_type="PROMPT_TUNING")
    with pytest.raises(ValueError, match="records no max_length"):
        FusedDePTEmbedding.from_pretrained(tmp_path, emb)
    assert FusedDePTEmbedding.from_pretrained(tmp_path, emb, max_length=8).max_length == 8
