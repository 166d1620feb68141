"""One adapted model called from 4 threads at once, 50 calls each (what a serving thread pool does):
every loss, logit, gradient and generated token equals the single-threaded value, bit for bit.
Models: DePT with the prompt shared (also inside ``serving()``) or in every row, Prefix-Tuning, and
a model with several named adapters whose calls pick one per row (``adapter_names``).

Each call mixes what can leak between calls if any of it lived on the model between hooks: labels
(the shared prompt's loss is completed in a forward hook), batch shapes and padding sides
(positions, masks), gradients recorded or not (the prompt pass, reentrancy checks), generate()
(the prompt pass kept on the call's cache). Gradients are taken with ``torch.autograd.grad`` so
calls never accumulate into each other's ``.grad``.

The ops run their PyTorch path here (``TRITON_INTERPRET=0``): the Triton interpreter keeps its grid
state in one global and cannot run kernels from several threads at once (the CUDA launcher can).
What is under test is the per-call state of the integration layer, which is the same on both paths.
"""
import threading
from contextlib import nullcontext

import pytest
import torch

from dept_fast import apply_dept, apply_prefix_tuning, serving
from dept_models import dept_model
from families import build
from tiny_models import VOCAB

THREADS, CALLS = 4, 50
FAMILY = "llama-gqa"
ROW_ADAPTERS = ["small", "prefix", "__base__", "default"]
"""The mixed model's adapters, the first rows of a batch take (cycled)."""


def batches():
    """Three batch shapes, unpadded, left- and right-padded, with labels -100 on the pads."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for rows, width, pad in ((1, 4, None), (2, 7, "left"), (3, 5, "right")):
        ids = torch.randint(3, VOCAB, (rows, width), generator=gen)
        mask = torch.ones_like(ids)
        if pad == "left":
            mask[0, :3] = 0
        elif pad == "right":
            mask[-1, -2:] = 0
        ids = ids.masked_fill(mask == 0, 0)
        out.append(dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)))
    return out


def calls(model, params, mixed):
    """The calls the threads draw from: each batch without and with gradients, and one generate();
    ``mixed``: each row names its adapter (``adapter_names``). Gradients of parameters a call does
    not use are empty tensors."""
    def names(inputs):
        rows = inputs["input_ids"].shape[0]
        return {"adapter_names": [ROW_ADAPTERS[(i + rows) % len(ROW_ADAPTERS)] for i in range(rows)]} if mixed else {}

    def forward(inputs, grad):
        def call():
            with torch.set_grad_enabled(grad):
                out = model(**inputs, **names(inputs))
                grads = torch.autograd.grad(out.loss, params, allow_unused=True) if grad else ()
            return [out.loss.detach(), out.logits.detach(), *(torch.zeros(0) if g is None else g for g in grads)]
        return call

    def generate(inputs):
        def call():
            with torch.no_grad():
                return [model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                       max_new_tokens=3, do_sample=False, **names(inputs))]
        return call

    inputs = batches()
    return [forward(b, grad) for b in inputs for grad in (False, True)] + [generate(inputs[1])]


def adapted(kind):
    """(model, trainable params) in eval mode: DePT with the prompt shared or in every row,
    Prefix-Tuning with its MLP, or both kinds under names of their own (DePT sharing its prompts)."""
    if kind == "mixed":
        model = dept_model(FAMILY)
        apply_dept(model, 2, 2, 12, lora_alpha=3.0, adapter_name="small")
        apply_prefix_tuning(model, 3, projection_dim=16, adapter_name="prefix")
        return model, [p for p in model.parameters() if p.requires_grad]
    if kind == "prefix":
        torch.manual_seed(0)
        model = apply_prefix_tuning(build(FAMILY), 3, projection_dim=16)
        model.generation_config.eos_token_id = None
        return model, list(model.prefix_tuning.parameters())
    model = dept_model(FAMILY, share=None if kind.startswith("shared") else False)
    assert model.dept.share_prompt == kind.startswith("shared")
    return model, [p for p in model.dept.parameters() if p.requires_grad]


@pytest.mark.parametrize("kind", ["shared", "shared-serving", "every-row", "prefix", "mixed"])
def test_concurrent_calls_equal_single_threaded(kind, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model, params = adapted(kind)
    work = calls(model, params, mixed=kind == "mixed")
    expected = [call() for call in work]
    mismatches, errors = [], []
    start = threading.Barrier(THREADS)

    def worker(thread):
        try:
            start.wait()
            for n in range(CALLS):
                index = (n * (thread + 1) + thread) % len(work)  # each thread its own order
                for got, want in zip(work[index](), expected[index]):
                    if got.shape != want.shape or not torch.equal(got, want):
                        mismatches.append((thread, n, index))
        except BaseException as error:  # surfaced below, not lost in the thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    with serving(model) if kind == "shared-serving" else nullcontext():
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors[0]
    assert not mismatches, f"{len(mismatches)} of {THREADS * CALLS} calls differ, e.g. (thread, call, case) {mismatches[:5]}"
