"""A DePT model under DistributedDataParallel: 2 CPU ranks (gloo), each with half of the batch,
reach the gradients of one process on the whole batch.

Each rank's loss is a mean over its label tokens and DDP averages the ranks' gradients; both
halves hold the same number of label tokens, so the average equals the full-batch mean's
gradient, up to fp32 summation order (rel_err <= 1e-5).
"""
import os
import tempfile
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from dept_fast import apply_dept
from numerics import rel_err
from families import build
from tiny_models import VOCAB

WORLD = 2


def dept_gpt2(share):
    model = apply_dept(build("gpt2", dropout=False), 3, 4, 16, share_prompt=share).train()
    with torch.no_grad():
        model.dept.lora_B.copy_(torch.linspace(-1, 1, model.dept.lora_B.numel()).view_as(model.dept.lora_B))
    return model


def full_batch():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (4, 7), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def adapter_grads(model):
    return [p.grad.clone() for p in (model.dept.prompt, model.dept.lora_A, model.dept.lora_B)]


def _rank(rank, share, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))  # fail rather than hang if a rank dies
    try:
        model = DistributedDataParallel(dept_gpt2(share))
        half = {k: v.chunk(WORLD)[rank] for k, v in full_batch().items()}
        model(**half).loss.backward()
        torch.save(adapter_grads(model.module), f"{out_file}.{rank}")
        del model  # free DDP's reducer while the group lives: freed after it, gloo's teardown can hang
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
@pytest.mark.parametrize("share", [True, False], ids=["shared-prompt", "prompt-in-every-row"])
def test_ddp_two_ranks_match_single_process(share):
    single = dept_gpt2(share)
    single(**full_batch()).loss.backward()
    want = adapter_grads(single)
    # A directory of our own, not tmp_path: concurrent pytest sessions prune old basetemps.
    with tempfile.TemporaryDirectory() as scratch:
        ranks = mp.spawn(_rank, args=(share, os.path.join(scratch, "init"), os.path.join(scratch, "grads")),
                         nprocs=WORLD, join=False)
        deadline = time.monotonic() + 300
        while not ranks.join(timeout=1):  # raises if a rank failed
            if time.monotonic() > deadline:
                for process in ranks.processes:
                    process.kill()
                pytest.fail("the DDP ranks did not finish within 300 s")
        got = [torch.load(os.path.join(scratch, f"grads.{rank}"), weights_only=True) for rank in range(WORLD)]
    for rank in range(WORLD):
        for name, g, w in zip(("prompt", "lora_A", "lora_B"), got[rank], want):
            assert w.abs().sum() > 0 and rel_err(g, w) <= 1e-5, (rank, name)
