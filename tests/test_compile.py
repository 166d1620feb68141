"""``torch.compile(model, fullgraph=True)`` of DePT (shared prompt, prompt in every row),
Prefix-Tuning and a mixed batch: forward and backward traced without a graph break, eager's loss,
logits and gradients, and batch sizes and lengths that change compile nothing more.

On CPU the backend is "aot_eager": Dynamo traces the forward and AOTAutograd the backward (the
graphs torch.compile builds), run by eager kernels. Inductor's code generation is left to the gpu
tests: on this CPU one inductor forward + backward of the tiny Llama compiles for over a minute (74 s
measured for the plain model, about as long for the shared prompt). Under compile the ops take their
PyTorch reference on CPU (an interpreted Triton launch cannot be traced; dept_fast/ops/backend.py),
and the DePT stage its per-position path (telling whether positions are columns would read the
mask on the host); on CUDA the gpu tests compile with inductor, the prefix MLP's Triton kernel in
the graph.

``torch.compile(model)`` compiles the model's forward and each of its forward hooks as a frame of
its own, each a full graph (``fullgraph=True`` would raise at any break). Shapes: ``dynamic=True``
compiles each frame once for every batch size and length (>= 2: sizes 0 and 1 are specialised by
Dynamo); without it a second shape recompiles once with dynamic sizes. A Python list of adapter
names is specialised: each distinct ``adapter_names`` list is a graph of its own (which adapters
the rows take decides which parameters the graph reads), so the mixed case changes lengths only.

Tolerance: the compiled graphs run the ATen ops eager runs, in fp32; AOTAutograd's decompositions
may reorder a reduction (sums of at most a few hundred terms here): TOL[float32].
"""
import pytest
import torch
from torch import nn

from dept_fast import apply_dept, apply_prefix_tuning
from dept_models import randomized
from families import build
from numerics import TOL, rel_err
from tiny_models import VOCAB

MIXED = ["dept", "pt", "__base__", "prefix", "dept", "small"]
SHAPES = [(6, 7), (7, 9), (8, 10)]
"""(batch, length): the first avoids the adapters' sizes (m 2, 3, 5, p 4), which Dynamo's duck sizing would tie
to the batch or length (one more compile when they part)."""
CASES = ["shared", "every-row", "prefix", "mixed"]


def adapted(case: str, family: str = "llama-gqa", device: str = "cpu") -> nn.Module:
    """The family's tiny model (dropout off, train mode) with the case's adapters, every adapter
    weight drawn at random (B is zero at initialisation)."""
    torch.manual_seed(0)
    model = build(family, dropout=False).to(device)
    if family == "gpt2":
        model.loss_type = "ForCausalLM"  # else transformers logs from inside the loss (a graph break), plain model too
    if case in ("shared", "every-row"):
        apply_dept(model, 3, 4, 16, share_prompt=None if case == "shared" else False)
    elif case == "prefix":
        apply_prefix_tuning(model, 4, projection_dim=16)
    else:
        apply_dept(model, 3, 4, 16, adapter_name="dept")
        apply_dept(model, 5, 0, 16, adapter_name="pt")
        apply_dept(model, 2, 2, 12, lora_alpha=3.0, adapter_name="small")
        apply_prefix_tuning(model, 4, projection_dim=None, adapter_name="prefix")
    return randomized(model, seed=1).train()


def batch(model: nn.Module, rows: int, length: int, device: str = "cpu") -> dict:
    """Random ids, row 0 left-padded by 2 (decoders) or right-padded (T5), labels."""
    gen = torch.Generator().manual_seed(rows * 100 + length)
    ids = torch.randint(3, VOCAB, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    if model.config.is_encoder_decoder:
        mask[0, -2:] = 0
        labels = torch.randint(3, VOCAB, (rows, 4), generator=gen)
    else:
        mask[0, :2] = 0
        labels = ids.masked_fill(mask == 0, -100)
    inputs = dict(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask, labels=labels)
    return {name: t.to(device) for name, t in inputs.items()}


def step(call, model: nn.Module, inputs: dict, names=None):
    out = call(**inputs, **({} if names is None else dict(adapter_names=names)))
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out.logits.detach(), out.loss.detach(), grads


def assert_same(got, want, inputs: dict, tol: float) -> None:
    (logits, loss, grads), (want_logits, want_loss, want_grads) = got, want
    length = inputs["attention_mask"].shape[1]
    if logits.shape[1] >= length:  # a decoder's real positions (the prompt in every row: its m columns first)
        real = inputs["attention_mask"].bool()
        logits, want_logits = logits[:, -length:][real], want_logits[:, -length:][real]
    assert rel_err(logits, want_logits) <= tol
    assert rel_err(loss, want_loss) <= tol
    assert set(grads) == set(want_grads) and grads
    for name, grad in grads.items():
        assert grad.abs().sum() > 0 and rel_err(grad, want_grads[name]) <= tol, name


FAMILY_CASES = [("llama-gqa", case) for case in CASES] + [("t5", "every-row"), ("t5", "prefix"), ("bart", "prefix"),
                                                            ("gpt2", "shared")]


@pytest.mark.parametrize("family, case", FAMILY_CASES)
def test_fullgraph_forward_and_backward_equal_eager(family, case):
    """aot_eager (forward and backward graphs), one shape: eager's logits, loss and gradients. T5: the
    encoder's and decoder's hooks, relative position bias; T5 and BART prefix: the encoder, decoder
    and cross-attention prefixes; GPT-2: learned positions."""
    torch._dynamo.reset()
    model = adapted(case, family)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    names = MIXED if case == "mixed" else None
    inputs = batch(model, len(MIXED) if case == "mixed" else 3, 7)
    assert_same(step(compiled, model, inputs, names), step(model, model, inputs, names), inputs, TOL[torch.float32])


@pytest.mark.parametrize("case", CASES)
def test_other_sizes_compile_nothing_more(case):
    """dynamic=True, three batch sizes and lengths (the mixed batch: lengths), each equal to eager: the
    frames compiled for the first serve the others. Dynamo alone (a counting backend that runs the
    captured graphs) keeps this cheap; the backward graphs are the test above's."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = adapted(case)
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=True)
    shapes = [(len(MIXED), length) for _, length in SHAPES] if case == "mixed" else SHAPES
    names = MIXED if case == "mixed" else None
    frames = []
    for rows, length in shapes:
        inputs = batch(model, rows, length)
        assert_same(step(compiled, model, inputs, names), step(model, model, inputs, names), inputs,
                    TOL[torch.float32])
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[-1] == frames[0], frames


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["shared", "prefix"])  # inductor compiles take tens of seconds each
def test_inductor_on_cuda_equals_eager(case):
    """Inductor with the Triton kernels (the prefix MLP's in the graph) on CUDA, fp32: eager's
    numbers within inductor's reordered fp32 reductions (fused softmax, norms; sums of <= 128 terms,
    ~n eps each, through a few chained ops: 1e-4), two sizes, one compile per frame."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = adapted(case, device="cuda")
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=True)
    frames = []
    for rows, length in SHAPES[:2]:
        inputs = batch(model, rows, length, device="cuda")
        assert_same(step(compiled, model, inputs), step(model, model, inputs), inputs, 1e-4)
        frames.append(counter.frame_count)
    assert frames[-1] == frames[0], frames
