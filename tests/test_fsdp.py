"""FSDP2 (``fully_shard``) and FSDP (``FullyShardedDataParallel``, ``use_orig_params=True``) on 2 CPU
ranks (gloo): the adapters train exactly as one process on the whole batch, and attaching an
adapter to an already sharded model is refused.

Each engine's cases (GPT-2 and GQA Llama x DePT with and without the shared prompt, prompt tuning,
Prefix-Tuning x gradient checkpointing on/off x resharding after forward on/off) run in one
spawned process group; see ``distributed.py`` for the comparison.
"""
import importlib.util
import math
import os
import pathlib
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist

from dept_fast import FusedDePTEmbedding, apply_dept, apply_prefix_tuning, load_dept, load_prefix_tuning
from distributed import (LR, SAVED_CASES, WORLD, Case, adapter_of, all_cases, assert_matches, assert_saved, base_model,
                         build, decoder_layers, init_group, mean_over_ranks, rank_batch, reference, refusal,
                         save_adapters, save_attempt, spawn, train, trainable_names)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

CASES = all_cases()
TIMEOUT = 600
APPLY_FIRST = "attach the adapter to the plain model first"
EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "fsdp2_dept.py"


@pytest.fixture(scope="module")
def references():
    return {str(case): reference(case) for case in {case.reference for case in CASES}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A saved DePT adapter and a saved Prefix-Tuning adapter of tiny GPT-2, for the load refusals."""
    return save_adapters(str(tmp_path_factory.mktemp("adapters")))


def attach_attempts(model, checkpoints, embedding_sharded=True):
    """Every way to attach an adapter to ``model``: what each raised. ``embedding_sharded``: the word
    embeddings' weight itself is sharded, so the bare module refuses it too (elsewhere it cannot tell)."""
    dept_path, prefix_path = checkpoints
    attempts = {
        "apply_dept": refusal(lambda: apply_dept(model, 3, 4, 16)),
        "apply_dept(share_prompt=False)": refusal(lambda: apply_dept(model, 3, 4, 16, share_prompt=False)),
        "apply_dept(rank=0)": refusal(lambda: apply_dept(model, 3, 0, 16)),
        "apply_prefix_tuning": refusal(lambda: apply_prefix_tuning(model, 3, projection_dim=8)),
        "load_dept": refusal(lambda: load_dept(model, dept_path)),
        "load_prefix_tuning": refusal(lambda: load_prefix_tuning(model, prefix_path)),
        "left untouched": "no error" if not any(hasattr(model, name) for name in ("dept", "prefix_tuning"))
        else "an adapter was attached",
    }
    if embedding_sharded:
        attempts["FusedDePTEmbedding"] = refusal(lambda: FusedDePTEmbedding(model.get_input_embeddings(), 3, 4, 16))
    return attempts


def assert_refused(attempts, engine):
    """Every attempt of :func:`attach_attempts` raised the ValueError naming ``engine`` and the order."""
    for attempt, raised in attempts.items():
        if attempt == "left untouched":
            assert raised == "no error", raised
        else:
            assert raised.startswith("ValueError") and APPLY_FIRST in raised and engine in raised, (attempt, raised)


def run_cases(rank, cases, wrap, full_grads):
    """Each case built, wrapped by ``wrap(model, case)`` and trained on this rank's rows."""
    results = {}
    for case in cases:
        model = build(case)
        names = trainable_names(model)
        model = wrap(model, case)
        params = [p for name, p in model.named_parameters() if clean(name) in names]
        optimizer = torch.optim.SGD(params, lr=LR)

        def step():
            loss = model(**rank_batch(rank)).loss
            loss.backward()
            return mean_over_ranks(loss)

        def update():
            optimizer.step()
            optimizer.zero_grad()

        results[str(case)] = train(step, lambda: full_grads(model, names), update)
    return results


def clean(name):
    """A parameter's name in the unwrapped model (FSDP prefixes the modules it wraps)."""
    return name.replace("_fsdp_wrapped_module.", "")


# ---------------------------------------------------------------------------------------------
# FSDP2


def _rank(rank, init_file, out_file, cases, checkpoints):
    """Both engines' cases and refusals in one process group (a spawn costs more than all the cases)."""
    init_group(rank, init_file)
    try:
        folder = os.path.dirname(checkpoints[0])  # the adapters the ranks save go beside the checkpoints
        results = {"fsdp2": _fsdp2(rank, cases, checkpoints, folder), "fsdp1": _fsdp1(rank, cases, checkpoints, folder),
                   "example": _example().main(["--steps", "5", "--rows", "2", "--length", "8"])}
        if rank == 0:
            torch.save(results, out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _example():
    """examples/fsdp2_dept.py as a module (run inside the ranks' process group, which it joins)."""
    spec = importlib.util.spec_from_file_location("fsdp2_dept", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


@pytest.fixture(scope="module")
def fsdp_run(checkpoints):
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2)")
    return spawn(_rank, (CASES, checkpoints), TIMEOUT)


# ---------------------------------------------------------------------------------------------
# FSDP2


def _fsdp2(rank, cases, checkpoints, folder):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))

    def wrap(model, case):
        for layer in decoder_layers(model, case.arch):
            fully_shard(layer, mesh=mesh, reshard_after_forward=case.reshard)
        return fully_shard(model, mesh=mesh, reshard_after_forward=case.reshard)

    def full_grads(model, names):
        return {name: p.grad.full_tensor() for name, p in model.named_parameters() if name in names}

    results = run_cases(rank, cases, wrap, full_grads)
    for case in SAVED_CASES:
        model = wrap(build(case), case)

        @contextmanager
        def unsharded():
            model.unshard()
            yield
            model.reshard()

        results[f"saved: {case}"] = save_attempt(adapter_of(model, case), unsharded, f"{folder}/fsdp2-{case}", rank)
    sharded = wrap(base_model("gpt2"), Case("gpt2", "dept"))
    results["refused: sharded"] = attach_attempts(sharded, checkpoints)
    sharded.unshard()  # the parameters are plain tensors in here: the wrapped modules still tell
    results["refused: inside unshard()"] = attach_attempts(sharded, checkpoints, embedding_sharded=False)
    sharded.reshard()
    layers_only = base_model("llama")
    for layer in decoder_layers(layers_only, "llama"):
        fully_shard(layer, mesh=mesh)
    results["refused: layers sharded"] = attach_attempts(layers_only, checkpoints, embedding_sharded=False)
    return results


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fsdp2_matches_single_process(fsdp_run, references, case):
    assert_matches(fsdp_run["fsdp2"][str(case)], references[str(case.reference)], case)


@pytest.mark.parametrize("situation", ["sharded", "inside unshard()", "layers sharded"])
def test_fsdp2_refuses_attaching_after_sharding(fsdp_run, situation):
    assert_refused(fsdp_run["fsdp2"][f"refused: {situation}"], "FSDP2")


# ---------------------------------------------------------------------------------------------
# FSDP (FullyShardedDataParallel)


def _fsdp1(rank, cases, checkpoints, folder):
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    def wrap(model, case, auto_wrap=True):
        layers = {type(layer) for layer in decoder_layers(model, case.arch)}
        strategy = ShardingStrategy.FULL_SHARD if case.reshard else ShardingStrategy.SHARD_GRAD_OP
        return FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"),
                                        auto_wrap_policy=ModuleWrapPolicy(layers) if auto_wrap else None,
                                        sharding_strategy=strategy)

    def full_grads(model, names):
        with FullyShardedDataParallel.summon_full_params(model, with_grads=True):
            return {clean(name): p.grad.clone() for name, p in model.named_parameters() if clean(name) in names}

    results = run_cases(rank, cases, wrap, full_grads)
    for case in SAVED_CASES:
        model = wrap(build(case), case)
        results[f"saved: {case}"] = save_attempt(adapter_of(model, case),
                                                 lambda: FullyShardedDataParallel.summon_full_params(model),
                                                 f"{folder}/fsdp1-{case}", rank)
    wrapped = wrap(base_model("gpt2"), Case("gpt2", "dept"))
    results["refused: wrapper"] = attach_attempts(wrapped, checkpoints)
    results["refused: wrapped module"] = attach_attempts(wrapped.module, checkpoints)
    with FullyShardedDataParallel.summon_full_params(wrapped):
        results["refused: inside summon_full_params()"] = attach_attempts(wrapped.module, checkpoints)
    root_only = wrap(base_model("llama"), Case("llama", "dept"), auto_wrap=False)
    results["refused: flat parameters"] = attach_attempts(root_only.module, checkpoints)
    return results


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fsdp1_matches_single_process(fsdp_run, references, case):
    assert_matches(fsdp_run["fsdp1"][str(case)], references[str(case.reference)], case)


@pytest.mark.parametrize("situation", ["wrapper", "wrapped module", "inside summon_full_params()", "flat parameters"])
def test_fsdp1_refuses_attaching_after_wrapping(fsdp_run, situation):
    assert_refused(fsdp_run["fsdp1"][f"refused: {situation}"], "FSDP")


def test_fsdp2_example_trains(fsdp_run):
    """examples/fsdp2_dept.py (the README's torchrun example) runs on 2 ranks and its loss falls."""
    losses = fsdp_run["example"]
    assert len(losses) == 5 and all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("engine", ["fsdp2", "fsdp1"])
@pytest.mark.parametrize("case", SAVED_CASES, ids=str)
def test_saving_a_sharded_adapter_is_refused_and_works_gathered(fsdp_run, checkpoints, engine, case):
    folder = os.path.join(os.path.dirname(checkpoints[0]), f"{engine}-{case}")
    assert_saved(fsdp_run[engine][f"saved: {case}"], folder, case)
