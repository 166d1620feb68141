"""``dept_fast.trainable_parameters``: the counts of an adapted model, by formula and against PEFT's
own count of the same adapters; shared and tied tensors counted once; PEFT's one-line summary."""
import re

import pytest
import torch

from dept_fast import apply_dept, apply_prefix_tuning, trainable_parameters
from families import FAMILIES, LAYOUTS, build
from tiny_models import VOCAB, tiny_gpt2

M, R, S, P, MID = 3, 4, 16, 3, 8


@pytest.mark.parametrize("rank", [R, 0], ids=["dept", "prompt-tuning"])
@pytest.mark.parametrize("family", FAMILIES)
def test_dept_counts(family, rank):
    base_total = build(family).num_parameters()  # transformers' own count (a tied output embedding once)
    model = apply_dept(build(family), M, rank, S)
    d = model.get_input_embeddings().embedding_dim
    count = trainable_parameters(model)
    assert count.trainable == M * d + S * rank + rank * d
    assert count.total == base_total + count.trainable  # the embeddings DePT wraps are the model's, counted once


def mlp_count(prefix_len, layers, kv_dim, embed_dim, mid):
    """Embedding(p, e) -> Linear(e, mid) -> tanh -> Linear(mid, layers * 2 * kv_dim)."""
    out = layers * 2 * kv_dim
    return prefix_len * embed_dim + (embed_dim * mid + mid) + (mid * out + out)


@pytest.mark.parametrize("projection_dim", [MID, None], ids=["mlp", "no-mlp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_counts(family, projection_dim):
    base_total = build(family).num_parameters()
    model = apply_prefix_tuning(build(family), P, projection_dim=projection_dim)
    d = model.get_input_embeddings().embedding_dim
    stacks = LAYOUTS[family].values()  # per self-attention stack (layers, kv_heads, head_dim)
    prefixes = sum(P * 2 * layers * kv_heads * head_dim for layers, kv_heads, head_dim in stacks)
    mlps = sum(mlp_count(P, layers, kv_heads * head_dim, d, MID) for layers, kv_heads, head_dim in stacks)
    count = trainable_parameters(model)
    assert count.trainable == (prefixes if projection_dim is None else mlps)
    assert count.total == base_total + count.trainable
    model.prefix_tuning.merge()  # the MLP gone, the prefixes kept
    assert trainable_parameters(model).trainable == prefixes


def test_tied_and_frozen_parameters():
    tied, untied = tiny_gpt2(), tiny_gpt2(tie_word_embeddings=False)
    assert trainable_parameters(untied).total - trainable_parameters(tied).total == VOCAB * 40
    assert trainable_parameters(tied).trainable == trainable_parameters(tied).total  # nothing frozen yet
    model = apply_dept(tied, M, R, S)
    model.get_input_embeddings().weight.requires_grad_(True)  # unfrozen E: counted once, as trainable
    assert trainable_parameters(model).trainable == VOCAB * 40 + M * 40 + S * R + R * 40


def test_matches_peft_on_the_same_adapters():
    """PEFT's prompt tuning and prefix tuning (with and without its MLP) count as ours."""
    peft = pytest.importorskip("peft")
    pairs = [
        (peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=M), lambda m: apply_dept(m, M, 0, S)),
        (peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
         lambda m: apply_prefix_tuning(m, P, projection_dim=None)),
        (peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True,
                                 encoder_hidden_size=MID), lambda m: apply_prefix_tuning(m, P, projection_dim=MID)),
    ]
    for config, attach in pairs:
        theirs = peft.get_peft_model(tiny_gpt2(), config).get_nb_trainable_parameters()
        assert tuple(trainable_parameters(attach(tiny_gpt2()))) == theirs, config.peft_type


def test_summary_line_reads_as_peft():
    count = trainable_parameters(apply_dept(tiny_gpt2(), M, R, S))
    line = str(count)
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", line)
    assert f"{count.trainable:,}" in line and f"{count.total:,}" in line
    assert count.percent == pytest.approx(100 * count.trainable / count.total)
    assert trainable_parameters(torch.nn.Module()).percent == 0.0  # no parameters: no division by zero
