"""Training parity under a sharding engine: the cases, their single-process reference, spawned gloo ranks.

A case is a tiny model (GPT-2, or Llama with grouped-query attention) with one adapter, trained for
:data:`STEPS` SGD steps. The reference is one process on the whole batch of 4 rows; under an
engine, each of :data:`WORLD` ranks takes 2 rows. Each rank's loss is a mean over its label tokens
and the engines average the ranks' gradients; both halves hold the same number of label tokens, so
the mean of the ranks' losses and the averaged gradients equal the whole batch's, up to fp32
summation order (rel_err <= 1e-5). Every rank's workers run all of an engine's cases in one process
group (spawning costs seconds, a case a fraction of one).
"""
import dataclasses
import os
import tempfile
import time
from datetime import timedelta
from typing import Callable, Dict, List, Sequence, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dept_fast import apply_dept, apply_prefix_tuning, enable_activation_checkpointing, load_dept, load_prefix_tuning
from numerics import rel_err
from tiny_models import VOCAB, tiny_gpt2, tiny_llama

WORLD = 2
STEPS = 2
LR = 1.0
TOLERANCE = 1e-5
ADAPTERS = ("dept-shared", "dept", "prompt", "prefix")
"""DePT with the shared prompt, DePT with the prompt in every row, prompt tuning (DePT rank 0), Prefix-Tuning."""
ARCHS = {"gpt2": lambda: tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), "llama": tiny_llama}
LAYERS = {"gpt2": "GPT2Block", "llama": "LlamaDecoderLayer"}
"""The decoder layer class of each architecture: the unit an engine wraps (or shards) on its own."""

Result = List[Dict[str, object]]
"""Per step: {"loss": the (mean) loss, "grads": {adapter parameter name: its full gradient}}."""


@dataclasses.dataclass(frozen=True)
class Case:
    arch: str
    adapter: str
    checkpointing: bool = False
    reshard: bool = True
    """FSDP2's reshard_after_forward; FSDP's FULL_SHARD (True) or SHARD_GRAD_OP (False)."""
    zero_init: bool = False
    """DeepSpeed: the base model built under ``deepspeed.zero.Init``."""

    def __str__(self) -> str:
        flags = [name for name, on in (("ckpt", self.checkpointing), ("no-reshard", not self.reshard),
                                       ("zero-init", self.zero_init)) if on]
        return "-".join([self.arch, self.adapter] + flags)

    @property
    def reference(self) -> "Case":
        """The single-process run this case must match (no checkpointing, nothing sharded)."""
        return Case(self.arch, self.adapter)


def all_cases(**fixed) -> List[Case]:
    """Every architecture x adapter x checkpointing x resharding (less the ``fixed`` fields)."""
    grid = {"arch": list(ARCHS), "adapter": list(ADAPTERS), "checkpointing": [False, True], "reshard": [True, False]}
    grid.update({name: [value] for name, value in fixed.items()})
    cases = [{}]
    for name, values in grid.items():
        cases = [{**case, name: value} for case in cases for value in values]
    return [Case(**case) for case in cases]


def base_model(arch: str) -> torch.nn.Module:
    return ARCHS[arch]().train()


def attach_adapter(model: torch.nn.Module, case: Case) -> torch.nn.Module:
    """``case``'s adapter on ``model`` (fixed seeds: every process builds the same values)."""
    torch.manual_seed(1)
    if case.adapter == "prefix":
        model = apply_prefix_tuning(model, 3, projection_dim=8)
    else:
        rank = 0 if case.adapter == "prompt" else 4
        model = apply_dept(model, 3, rank, 16, share_prompt=case.adapter == "dept-shared")
        if rank:  # B starts at zero, which would leave A's first gradient zero
            with torch.no_grad():
                model.dept.lora_B.copy_(torch.linspace(-0.1, 0.1, model.dept.lora_B.numel()).view_as(model.dept.lora_B))
    if case.checkpointing:
        enable_activation_checkpointing(model, use_reentrant=False)
    return model


def build(case: Case) -> torch.nn.Module:
    return attach_adapter(base_model(case.arch), case)


def save_adapters(folder) -> Tuple[str, str]:
    """A DePT and a Prefix-Tuning adapter of tiny GPT-2 saved under ``folder``: their two directories."""
    dept, prefix = os.path.join(folder, "dept"), os.path.join(folder, "prefix")
    apply_dept(tiny_gpt2(), 3, 4, 16).dept.save_pretrained(dept)
    apply_prefix_tuning(tiny_gpt2(), 3, projection_dim=8).prefix_tuning.save_pretrained(prefix)
    return dept, prefix


def decoder_layers(model: torch.nn.Module, arch: str) -> List[torch.nn.Module]:
    return [module for module in model.modules() if type(module).__name__ == LAYERS[arch]]


def full_batch() -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2 * WORLD, 7), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def rank_batch(rank: int) -> Dict[str, torch.Tensor]:
    return {name: value.chunk(WORLD)[rank] for name, value in full_batch().items()}


def trainable_names(model: torch.nn.Module) -> List[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def train(step: Callable[[], torch.Tensor], grads: Callable[[], Dict[str, torch.Tensor]],
          update: Callable[[], None]) -> Result:
    """:data:`STEPS` times: ``step()`` (forward + backward, returning the loss), then ``grads()``, then ``update()``."""
    results = []
    for _ in range(STEPS):
        loss = step()
        results.append({"loss": loss.detach().clone(), "grads": grads()})
        update()
    return results


def reference(case: Case) -> Result:
    """One process, the whole batch, plain SGD."""
    model = build(case.reference)
    params = dict(model.named_parameters())
    names = trainable_names(model)
    optimizer = torch.optim.SGD([params[name] for name in names], lr=LR)

    def step():
        loss = model(**full_batch()).loss
        loss.backward()
        return loss

    def update():
        optimizer.step()
        optimizer.zero_grad()

    return train(step, lambda: {name: params[name].grad.clone() for name in names}, update)


def mean_over_ranks(loss: torch.Tensor) -> torch.Tensor:
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    return loss / WORLD


def assert_matches(got: Result, want: Result, case: Case) -> None:
    assert len(got) == len(want) == STEPS, case
    for step, (g, w) in enumerate(zip(got, want)):
        assert rel_err(g["loss"], w["loss"]) <= TOLERANCE, (str(case), step, "loss", g["loss"], w["loss"])
        assert sorted(g["grads"]) == sorted(w["grads"]), (str(case), sorted(g["grads"]), sorted(w["grads"]))
        for name, expected in w["grads"].items():
            assert expected.abs().sum() > 0, (str(case), step, name, "zero reference gradient")
            error = rel_err(g["grads"][name], expected)
            assert error <= TOLERANCE, (str(case), step, name, error)


def init_group(rank: int, init_file: str) -> None:
    """Join the gloo group of :data:`WORLD` ranks; one thread each (the ranks share the CPU cores)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))  # fail rather than hang if a rank dies


def spawn(worker: Callable, args: Sequence, timeout: float) -> dict:
    """Run ``worker(rank, init_file, out_file, *args)`` on :data:`WORLD` spawned ranks; what rank 0
    saved to ``out_file`` (``torch.save``). A rank that fails fails the test, one that hangs is killed
    after ``timeout`` seconds."""
    # A directory of our own, not tmp_path: concurrent pytest sessions prune old basetemps.
    with tempfile.TemporaryDirectory() as scratch:
        out_file = os.path.join(scratch, "out")
        ranks = mp.spawn(worker, args=(os.path.join(scratch, "init"), out_file, *args), nprocs=WORLD, join=False)
        deadline = time.monotonic() + timeout
        while not ranks.join(timeout=1):  # raises if a rank failed
            if time.monotonic() > deadline:
                for process in ranks.processes:
                    process.kill()
                pytest.fail(f"the ranks did not finish within {timeout} s")
        return torch.load(out_file, weights_only=False)


SAVED_CASES = (Case("gpt2", "dept"), Case("llama", "prefix"))
"""The adapters the engine tests save from a sharded model (one DePT, one Prefix-Tuning)."""


def adapter_of(model: torch.nn.Module, case: Case) -> torch.nn.Module:
    return model.prefix_tuning if case.adapter == "prefix" else model.dept


def save_attempt(adapter: torch.nn.Module, gather: Callable, folder: str, rank: int) -> str:
    """Saving a sharded adapter: what ``adapter.save_pretrained`` raised; then, inside ``gather()``
    (the engine's full-parameter scope, entered on every rank), rank 0 saves it into ``folder``."""
    raised = refusal(lambda: adapter.save_pretrained(folder + "-sharded"))
    with gather():
        if rank == 0:
            adapter.save_pretrained(folder)
    return raised


def assert_saved(raised: str, folder: str, case: Case) -> None:
    """The sharded save was refused, and the gathered one holds the adapter ``build(case)`` makes."""
    assert raised.startswith("ValueError") and "is sharded" in raised, raised
    load = load_prefix_tuning if case.adapter == "prefix" else load_dept
    got = adapter_of(load(base_model(case.arch), folder), case).state_dict()
    want = adapter_of(build(case), case).state_dict()
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def refusal(attempt: Callable[[], object]) -> str:
    """What ``attempt()`` raised, as "Type: message", or "no error"."""
    try:
        attempt()
    except Exception as error:  # noqa: BLE001 - the test reads what was raised
        return f"{type(error).__name__}: {error}"
    return "no error"
