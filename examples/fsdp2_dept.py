"""DePT under FSDP2 (``fully_shard``), launched with torchrun: attach the adapter, then shard.

    torchrun --nproc-per-node 2 examples/fsdp2_dept.py             # CPU: gloo; GPUs: nccl, one per process
    torchrun --nproc-per-node 2 examples/fsdp2_dept.py --steps 50

Each process trains on its own rows; FSDP2 shards every parameter (the frozen base model's and
the adapter's) across the processes and averages the adapter's gradients, so the run trains as
one process on all rows would. The order matters: ``apply_dept`` (or ``apply_prefix_tuning``,
``load_dept``, ...) on the plain model first, then ``fully_shard`` on each decoder layer and on the
model, then the optimizer over the sharded parameters. Attaching an adapter to a model that is
already sharded is refused with a ValueError. The base model is a tiny random GPT-2 (nothing is
downloaded) and the batch is fixed, so the loss falls quickly.
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import GPT2Config, GPT2LMHeadModel

from dept_fast import apply_dept, param_groups


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=4, help="rows per process")
    parser.add_argument("--length", type=int, default=16)
    return parser.parse_args(argv)


def main(argv=None) -> list:
    """Train; returns this process's losses. Joins (or starts, under torchrun) the default process group."""
    args = parse_args(argv)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else None
    try:
        torch.manual_seed(0)  # the same base model and adapter on every process
        config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=1,
                            eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(config).train()
        model = apply_dept(model, num_prompt_tokens=8, rank=4, max_length=args.length)  # 1. the adapter first
        if device is not None:
            model.to(device)
        for block in model.transformer.h:  # 2. then shard: each decoder layer, then the rest
            fully_shard(block)
        fully_shard(model)
        optimizer = torch.optim.AdamW(param_groups(model, lr_prompt=0.3, lr_lowrank=3e-3))  # 3. then the optimizer
        ids = torch.randint(3, config.vocab_size, (args.rows, args.length),
                            generator=torch.Generator().manual_seed(rank)).to(device or "cpu")  # this rank's rows
        losses = []
        for _ in range(args.steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        if rank == 0:
            print(f"rank 0 of {dist.get_world_size()}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        return losses
    finally:
        if started:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
