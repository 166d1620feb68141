"""FusedDePTEmbedding as a module: parameters, initialisation, dispatch, and clear errors."""
import math

import pytest
import torch
from torch import nn

import dept_fast
from dept_fast import FusedDePTEmbedding, dept_embedding_reference
from numerics import TOL, rel_err


def make_module(V=50, d=40, m=7, r=5, s=16, device="cpu", **kw):
    torch.manual_seed(0)
    return FusedDePTEmbedding(nn.Embedding(V, d).to(device), num_prompt_tokens=m, rank=r, max_length=s, **kw)


def test_parameters_names_shapes_and_init():
    mod = make_module(lora_alpha=8.0)
    assert {n for n, p in mod.named_parameters() if p.requires_grad} == {"prompt", "lora_A", "lora_B"}
    assert mod.prompt.shape == (7, 40) and mod.lora_A.shape == (16, 5) and mod.lora_B.shape == (5, 40)
    assert mod.scaling == pytest.approx(8.0 / math.sqrt(5))
    assert not mod.word_embeddings.weight.requires_grad
    assert mod.weight is mod.word_embeddings.weight
    # DePT authors' init: B = 0 (update starts at zero), A Kaiming-uniform(a=sqrt 5): |A| <= 1/sqrt(r).
    assert torch.all(mod.lora_B == 0)
    assert mod.lora_A.abs().max() <= 1 / math.sqrt(5) and mod.lora_A.std() > 0
    # Prompt rows are copies of vocabulary rows (sampled-vocabulary init), not views of E.
    rows = (mod.prompt[:, None, :] == mod.word_embeddings.weight[None]).all(-1).any(-1)
    assert rows.all() and mod.prompt.data_ptr() != mod.word_embeddings.weight.data_ptr()


def test_vanilla_prompt_tuning_rank_zero():
    mod = make_module(r=0)
    assert mod.scaling == 0.0 and mod.lora_A.shape == (16, 0) and mod.lora_B.shape == (0, 40)
    ids = torch.randint(0, 50, (2, 9))
    out = mod(ids)
    assert torch.equal(out[:, 7:], mod.word_embeddings(ids))
    assert torch.equal(out[:, :7], mod.prompt.detach().expand(2, -1, -1))


def test_module_matches_reference_and_trains(device, poison):
    mod = make_module(device=device)
    nn.init.normal_(mod.lora_B)
    ids = torch.randint(0, 50, (3, 11), device=device)
    out = mod(ids)
    ref = dept_embedding_reference(ids, mod.weight, mod.prompt, mod.lora_A, mod.lora_B, mod.scaling)
    assert rel_err(out, ref) <= TOL[torch.float32]
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (mod.prompt, mod.lora_A, mod.lora_B))
    assert mod.word_embeddings.weight.grad is None


def test_plain_cpu_runs_the_reference_not_the_kernels(monkeypatch):
    """Without TRITON_INTERPRET, CPU tensors take the eager reference path."""
    from dept_fast import kernels

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(kernels, "dept_forward", lambda *a, **k: pytest.fail("kernel launched on plain CPU"))
    mod = make_module()
    ids = torch.randint(0, 50, (2, 9))
    out = mod(ids)
    assert torch.equal(out, dept_embedding_reference(ids, mod.weight, mod.prompt, mod.lora_A, mod.lora_B,
                                                     mod.scaling))


def test_interpreter_runs_the_kernels(monkeypatch):
    from dept_fast import kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    real = kernels.dept_forward
    monkeypatch.setattr(kernels, "dept_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    make_module()(torch.randint(0, 50, (2, 9)))
    assert calls == [1]


@pytest.mark.parametrize("bad_ids, exc, match", [
    (torch.rand(2, 5), TypeError, "int64 or int32"),
    (torch.randint(0, 50, (5,)), ValueError, "2-D .*unsqueeze"),
    (torch.randint(0, 50, (2, 17)), ValueError, "exceeds max_length 16"),
    (torch.tensor([[1, 2, 50]]), ValueError, r"\[0, 50\).*\[1, 50\]"),
    (torch.tensor([[-1, 2, 3]]), ValueError, r"\[0, 50\).*\[-1, 3\]"),
    ([[1, 2]], TypeError, "torch.Tensor"),
], ids=["float-ids", "1-D", "too-long", "id=V", "negative-id", "list"])
def test_bad_ids_raise_before_launch(bad_ids, exc, match, monkeypatch):
    from dept_fast import kernels

    monkeypatch.setattr(kernels, "dept_forward", lambda *a, **k: pytest.fail("launched on bad input"))
    with pytest.raises(exc, match=match):
        make_module()(bad_ids)


def test_mismatched_devices_and_shapes_raise():
    mod = make_module()
    with pytest.raises(ValueError, match="input_ids are on meta"):
        mod(torch.zeros(2, 3, dtype=torch.long, device="meta"))
    args = dict(input_ids=torch.zeros(1, 3, dtype=torch.long), weight=torch.randn(50, 40),
                prompt=torch.randn(7, 40), lora_A=torch.randn(16, 5), lora_B=torch.randn(5, 40), scaling=1.0)
    with pytest.raises(ValueError, match="prompt has width 39"):
        dept_fast.dept_embedding(**{**args, "prompt": torch.randn(7, 39)})
    with pytest.raises(ValueError, match=r"lora_B must have shape \(rank, d\) = \(5, 40\)"):
        dept_fast.dept_embedding(**{**args, "lora_B": torch.randn(4, 40)})
    with pytest.raises(ValueError, match="lora_A is on meta"):
        dept_fast.dept_embedding(**{**args, "lora_A": torch.randn(16, 5, device="meta")})
    with pytest.raises(TypeError, match="word embeddings must be float32"):
        dept_fast.dept_embedding(**{**args, "weight": torch.zeros(50, 40, dtype=torch.int32)})
    with pytest.raises(TypeError, match=r"lora_A \(torch.bfloat16\) and lora_B \(torch.float32\) must share a dtype"):
        dept_fast.dept_embedding(**{**args, "lora_A": torch.randn(16, 5, dtype=torch.bfloat16)})


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_prompt_tokens=-1), "num_prompt_tokens"),
    (dict(rank=2.5), "rank"),
    (dict(max_length=0), "max_length"),
])
def test_bad_constructor_arguments(kwargs, match):
    base = dict(num_prompt_tokens=4, rank=2, max_length=8)
    with pytest.raises(ValueError, match=match):
        FusedDePTEmbedding(nn.Embedding(10, 8), **{**base, **kwargs})
    with pytest.raises(TypeError, match="nn.Embedding"):
        FusedDePTEmbedding(nn.Linear(10, 8), **base)
