"""DeepSpeed ZeRO-3 on 2 CPU ranks (gloo): the adapters train exactly as one process on the whole
batch, with the base model built normally or under ``deepspeed.zero.Init``; attaching an adapter
after ``deepspeed.initialize`` is refused.

Needs the optional ``deepspeed`` package (skipped without it). On a CPU, DeepSpeed compiles its
``deepspeed_shm_comm`` op on first use (minutes; cached afterwards). ``tests/deepspeed_check.sh``
installs DeepSpeed and runs this file. Every parameter is partitioned (persistence thresholds 0),
so each read outside the engine's gathering would see a (0,) placeholder.
"""
import os

import pytest
import torch
import torch.distributed as dist

from dept_fast import FusedDePTEmbedding, apply_dept, apply_prefix_tuning, load_dept, load_prefix_tuning
from distributed import (ARCHS, LR, SAVED_CASES, WORLD, adapter_of, all_cases, assert_matches, assert_saved,
                         attach_adapter, base_model, build, init_group, mean_over_ranks, rank_batch, reference, refusal,
                         save_adapters, save_attempt, spawn, train, trainable_names)
from numerics import rel_err

pytestmark = [
    pytest.mark.deepspeed,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"),
]

CASES = all_cases(reshard=True, zero_init=False) + all_cases(reshard=True, zero_init=True)
TIMEOUT = 1200  # the first run compiles DeepSpeed's CPU communication op
CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_allow_untested_optimizer": True,
    "gradient_clipping": 0.0,  # plain SGD, as the reference (DeepSpeed clips at norm 1 by default)
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                          "stage3_model_persistence_threshold": 0},
}
APPLY_FIRST = "attach the adapter to the plain model first"


def _zero_init_model(path):
    """``from_pretrained`` under ``zero.Init``, as with the HF Trainer and a ZeRO-3 config: every weight
    a (0,) placeholder. Returns the model and the object that keeps transformers' ZeRO-3 mode on."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = HfDeepSpeedConfig(CONFIG)  # transformers builds under zero.Init while this object lives
    model = AutoModelForCausalLM.from_pretrained(path).train()
    assert model.get_input_embeddings().weight.shape == (0,), "zero.Init left the embeddings unpartitioned"
    return model, zero3


def _case(rank, case, saved):
    import deepspeed

    if case.zero_init:
        model, zero3 = _zero_init_model(saved[case.arch])  # noqa: F841 - ZeRO-3 mode on for this case
        model = attach_adapter(model, case)
    else:
        model = build(case)
    names = trainable_names(model)
    params = [p for name, p in model.named_parameters() if name in names]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(params, lr=LR), config=CONFIG)

    def step():
        loss = engine(**rank_batch(rank)).loss
        engine.backward(loss)
        return mean_over_ranks(loss)

    def grads():
        return {name: deepspeed.utils.safe_get_full_grad(p).clone() for name, p in engine.module.named_parameters()
                if name in names}

    return train(step, grads, engine.step)


def _loads(saved, checkpoints):
    """``load_dept`` / ``load_prefix_tuning`` on a model built under ``zero.Init``: what differs from
    the same load on the plain model (tensor name -> rel_err), or the error."""
    dept_path, prefix_path = checkpoints
    found = {}
    for name, load, adapter in (("load_dept", load_dept, "dept"), ("load_prefix_tuning", load_prefix_tuning,
                                                                    "prefix_tuning")):
        path = dept_path if adapter == "dept" else prefix_path
        plain = getattr(load(base_model("gpt2"), path), adapter).state_dict()
        model, zero3 = _zero_init_model(saved["gpt2"])  # noqa: F841 - ZeRO-3 mode on for this load
        try:
            loaded = getattr(load(model, path), adapter).state_dict()
            found[name] = {key: rel_err(loaded[key], value) for key, value in plain.items()}
        except Exception as error:  # noqa: BLE001 - reported to the test
            found[name] = f"{type(error).__name__}: {error}"
    return found


def _saves(rank, folder):
    """Saving each of :data:`SAVED_CASES`'s adapters after ``deepspeed.initialize`` (see ``save_attempt``)."""
    import deepspeed

    saved = {}
    for case in SAVED_CASES:
        model = build(case)
        params = [p for p in model.parameters() if p.requires_grad]
        deepspeed.initialize(model=model, optimizer=torch.optim.SGD(params, lr=LR), config=CONFIG)
        adapter = adapter_of(model, case)
        saved[str(case)] = save_attempt(adapter, lambda: deepspeed.zero.GatheredParameters(list(adapter.parameters())),
                                        os.path.join(folder, f"zero3-{case}"), rank)
    return saved


def _refusals(rank):
    import deepspeed

    mixed = apply_dept(apply_dept(base_model("gpt2"), 3, 4, 16, adapter_name="a"), 2, 2, 16, adapter_name="b")
    params = [p for p in mixed.parameters() if p.requires_grad]
    mixed, *_ = deepspeed.initialize(model=mixed, optimizer=torch.optim.SGD(params, lr=LR), config=CONFIG)
    model = base_model("gpt2")
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=CONFIG)
    return {
        "a batch mixing DePT adapters": refusal(lambda: mixed(**rank_batch(rank), adapter_names=["a", "b"])),
        "apply_dept": refusal(lambda: apply_dept(model, 3, 4, 16)),
        "apply_dept(share_prompt=False)": refusal(lambda: apply_dept(model, 3, 4, 16, share_prompt=False)),
        "apply_dept on the engine": refusal(lambda: apply_dept(engine, 3, 4, 16)),
        "apply_prefix_tuning": refusal(lambda: apply_prefix_tuning(model, 3, projection_dim=8)),
        "FusedDePTEmbedding": refusal(lambda: FusedDePTEmbedding(model.get_input_embeddings(), 3, 4, 16)),
    }


def _rank(rank, init_file, out_file, cases, saved, checkpoints, folder):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    init_group(rank, init_file)
    try:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # takes the group above
        results = {str(case): _case(rank, case, saved) for case in cases}
        results["loads"] = _loads(saved, checkpoints)
        results["saves"] = _saves(rank, folder)
        results["refusals"] = _refusals(rank)
        if rank == 0:
            torch.save(results, out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory):
    pytest.importorskip("deepspeed", reason="needs the optional deepspeed package")
    folder = tmp_path_factory.mktemp("base_models")
    saved = {}
    for arch in ARCHS:  # the base models of the references, for from_pretrained under zero.Init
        saved[arch] = str(folder / arch)
        base_model(arch).save_pretrained(saved[arch])
    return spawn(_rank, (CASES, saved, save_adapters(str(folder)), str(folder)), TIMEOUT), str(folder)


@pytest.fixture(scope="module")
def references():
    return {str(case): reference(case) for case in {case.reference for case in CASES}}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_zero3_matches_single_process(deepspeed_run, references, case):
    assert_matches(deepspeed_run[0][str(case)], references[str(case.reference)], case)


def test_zero3_refuses_attaching_after_initialize(deepspeed_run):
    for attempt, raised in deepspeed_run[0]["refusals"].items():
        expected = "under ZeRO-3 give each batch one adapter" if attempt.startswith("a batch") else APPLY_FIRST
        assert raised.startswith("ValueError") and expected in raised and "DeepSpeed" in raised, (attempt, raised)


@pytest.mark.parametrize("load", ["load_dept", "load_prefix_tuning"])
def test_zero3_loads_onto_a_model_built_under_zero_init(deepspeed_run, load):
    """The adapter read from disk onto a partitioned model equals the one loaded onto the plain model."""
    errors = deepspeed_run[0]["loads"][load]
    assert isinstance(errors, dict) and errors, errors
    assert all(error == 0 for error in errors.values()), errors


@pytest.mark.parametrize("case", SAVED_CASES, ids=str)
def test_zero3_saving_is_refused_on_placeholders_and_works_gathered(deepspeed_run, case):
    results, folder = deepspeed_run
    assert_saved(results["saves"][str(case)], os.path.join(folder, f"zero3-{case}"), case)
