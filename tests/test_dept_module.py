"""FusedDePTEmbedding as a module: parameters, initialisation, dispatch, the model's embedding
multiplier (``embed_scale``), and clear errors."""
import json
import math

import pytest
import torch
from torch import nn

import dept_fast
from dept_fast import FusedDePTEmbedding, dept_embedding_reference
from dept_fast.modules.dept_embedding import mixed_dept_embedding
from dept_inputs import EMBED_SCALE
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_embed_scale_scales_the_tokens_and_the_prompt_init(dtype, device, poison):
    """With the model's multiplier c: the prompt starts as what the model's embedding gives for
    sampled ids (c * E[ids] in fp32, rounded to E's dtype) and the stage is [P ; c E[ids] + s (A B)[:L]]
    on both paths (fused, per-position); the gradients are in test_dept_parity.py."""
    torch.manual_seed(0)
    mod = FusedDePTEmbedding(nn.Embedding(50, 40).to(device, dtype), 7, 5, 16, embed_scale=EMBED_SCALE)
    assert isinstance(mod.embed_scale, float) and mod.embed_scale == EMBED_SCALE
    assert f"embed_scale={EMBED_SCALE}" in repr(mod)
    embedded = (mod.weight.float() * EMBED_SCALE).to(dtype)  # the model's embedding of every id
    assert mod.prompt.dtype == dtype
    assert (mod.prompt[:, None, :] == embedded[None]).all(-1).any(-1).all()

    nn.init.normal_(mod.lora_B)
    tokens = torch.randint(0, 50, (3, 11), device=device)
    out = mod(tokens)
    ref = dept_embedding_reference(tokens, mod.weight, mod.prompt, mod.lora_A, mod.lora_B, mod.scaling,
                                   embed_scale=EMBED_SCALE)
    assert out.dtype == dtype and rel_err(out, ref) <= TOL[dtype]
    per_position = mod(tokens, positions=torch.arange(11, device=device).expand(3, 11))
    assert rel_err(per_position, ref) <= TOL[dtype]
    unscaled = dept_embedding_reference(tokens, mod.weight, mod.prompt, mod.lora_A, mod.lora_B, mod.scaling)
    assert rel_err(out, unscaled) > 0.1  # c really applies (E's rows are most of each token's value)


def test_embed_scale_is_given_again_not_saved(tmp_path, device):
    """save_pretrained writes no embed_scale (it belongs to the base model); from_pretrained takes it
    (and defaults to 1) and the loaded module gives the saved one's numbers."""
    mod = make_module(device=device, embed_scale=EMBED_SCALE)
    nn.init.normal_(mod.lora_B)
    mod.save_pretrained(tmp_path)
    assert "embed_scale" not in json.loads((tmp_path / "dept_config.json").read_text())
    back = FusedDePTEmbedding.from_pretrained(tmp_path, mod.word_embeddings, embed_scale=EMBED_SCALE)
    assert back.embed_scale == EMBED_SCALE
    for name in ("prompt", "lora_A", "lora_B"):
        assert torch.equal(getattr(back, name), getattr(mod, name)), name
    ids = torch.randint(0, 50, (2, 9), device=device)
    assert torch.equal(back(ids), mod(ids))
    assert FusedDePTEmbedding.from_pretrained(tmp_path, mod.word_embeddings).embed_scale == 1.0


def test_mixed_batch_needs_one_embed_scale():
    """Adapters of one mixed batch share E, so they must share its multiplier: refused otherwise,
    and the common one is applied."""
    first, second = make_module(embed_scale=EMBED_SCALE), make_module(m=3, r=2, embed_scale=EMBED_SCALE)
    second.word_embeddings = first.word_embeddings
    ids, index = torch.randint(0, 50, (3, 5)), torch.tensor([1, 0, -1])
    out = mixed_dept_embedding([first, second], index, ids)
    assert rel_err(out[2, 7:], EMBED_SCALE * first.weight[ids[2]]) <= TOL[torch.float32]
    second.embed_scale = 1.0
    with pytest.raises(ValueError, match=r"share one embed_scale .*\[1.0, 6.32"):
        mixed_dept_embedding([first, second], index, ids)


@pytest.mark.parametrize("value, exc, match", [
    (torch.tensor(2.0), TypeError, r"embed_scale must be a Python float, got Tensor \(pass float\(tensor\)"),
    ("2", TypeError, "embed_scale must be a Python float, got str"),
    (True, TypeError, "embed_scale must be a Python float, got bool"),
    (float("nan"), ValueError, "embed_scale must be finite, got nan"),
    (float("inf"), ValueError, "embed_scale must be finite, got inf"),
], ids=["tensor", "str", "bool", "nan", "inf"])
def test_bad_embed_scale_is_refused(value, exc, match):
    with pytest.raises(exc, match=match):
        make_module(embed_scale=value)
    with pytest.raises(exc, match=match):
        dept_fast.dept_embedding(torch.zeros(1, 3, dtype=torch.long), torch.randn(50, 40), torch.randn(7, 40),
                                 torch.randn(16, 5), torch.randn(5, 40), 1.0, embed_scale=value)


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
    with pytest.raises(TypeError, match="Linear does not take token ids"):
        FusedDePTEmbedding(nn.Linear(10, 8), **base)
