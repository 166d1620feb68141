"""The GPU launch plans, checked without a GPU: SM counts of an H100 SXM (132) and an A100 (108)."""
import pytest
import torch
import triton

from bench_shapes import dept_cases, mixed_cases, prefix_cases
from dept_fast.kernels import dept_backward, tiling
from dept_fast.kernels.dept_backward import _dept_bwd_kernel, plan_dept_backward
from dept_fast.kernels.dept_forward import plan_dept_forward
from dept_fast.kernels.prefix_kv import plan_prefix_kv_backward, plan_prefix_kv_forward

SM_COUNTS = {"H100": 132, "A100": 108}
# The launch-bound benchmark shape (b 2, m + L 40, d 128 / p 8, N 128) has fewer 16-row tiles x batch
# rows (and prefix tiles) than SMs: its whole output is 20 KB (8 KB), one wave of a few programs.
LAUNCH_BOUND = "tiny-launch-bound"


def dept_plans(case, sm_count: int) -> dict:
    n_pos, es = case.prompt + case.seq_len, case.dtype.itemsize
    return {"forward": plan_dept_forward(case.batch, case.prompt, case.seq_len, case.dim, case.rank, es, es == 2,
                                         sm_count),
            "backward": plan_dept_backward(case.batch, n_pos, case.dim, es, False, sm_count),
            "backward+dE": plan_dept_backward(case.batch, n_pos, case.dim, es, True, sm_count)}


def mixed_plans(case, sm_count: int) -> dict:
    """Plans of a mixed batch: k adapters packed with the trailing no-adapter one."""
    k, n_pos, es = case.adapters + 1, case.prompt + case.seq_len, case.dtype.itemsize
    return {"forward": plan_dept_forward(case.batch, case.prompt, case.seq_len, case.dim, case.rank, es, es == 2,
                                         sm_count, adapters=k),
            "backward": plan_dept_backward(case.batch, n_pos, case.dim, es, False, sm_count, adapters=k),
            "backward+dE": plan_dept_backward(case.batch, n_pos, case.dim, es, True, sm_count, adapters=k)}


def prefix_plans(case, sm_count: int) -> dict:
    n_out = case.layers * 2 * case.kv_heads * case.head_dim
    shape = (case.prefix_len, case.mid, n_out, case.head_dim)
    weight, hidden, _ = plan_prefix_kv_backward(*shape, case.dtype.itemsize, case.dtype, sm_count)
    return {"forward": plan_prefix_kv_forward(*shape, case.dtype, sm_count), "weight-grad": weight,
            "hidden-grad": hidden}


@pytest.mark.parametrize("gpu", SM_COUNTS)
@pytest.mark.parametrize("name", [n for n in dept_cases() if n != LAUNCH_BOUND])
def test_dept_kernels_fill_the_gpu_at_benchmark_shapes(name, gpu):
    for kernel, plan in dept_plans(dept_cases()[name], SM_COUNTS[gpu]).items():
        assert plan.programs >= SM_COUNTS[gpu], kernel


@pytest.mark.parametrize("gpu", SM_COUNTS)
@pytest.mark.parametrize("name", mixed_cases())
def test_mixed_batch_dept_kernels_fill_the_gpu(name, gpu):
    for kernel, plan in mixed_plans(mixed_cases()[name], SM_COUNTS[gpu]).items():
        assert plan.programs >= SM_COUNTS[gpu], kernel
        assert plan.meta["INDEXED"] and plan.grid[2] % (mixed_cases()[name].adapters + 1) == 0, kernel


def test_packed_adapters_multiply_the_programs_per_tile():
    """With k adapters every tile runs k segments: the T5-base bf16 backward, which narrows its tiles to
    fill 132 SMs with one adapter, keeps 512-byte tiles with 4, and splits no adapter's rows (the cap
    b x 2 bytes / (32 k) keeps the fp32 partial sums at one slab per adapter)."""
    one = plan_dept_backward(32, 316, 768, 2, False, 132)
    four = plan_dept_backward(32, 316, 768, 2, False, 132, adapters=4)
    assert one.meta["BLOCK_D"] * 2 == 256 and four.meta["BLOCK_D"] * 2 == 512
    assert four.grid[2] == 4 and four.programs >= 132
    assert tiling.choose_tiles(32, 316, 768, 2, 132, runs=2).groups == 5  # ceil(4 x 132 / (60 tiles x 2 runs))


@pytest.mark.parametrize("gpu", SM_COUNTS)
@pytest.mark.parametrize("name", [n for n in prefix_cases() if n != LAUNCH_BOUND])
def test_prefix_kernels_fill_the_gpu_at_benchmark_shapes(name, gpu):
    for kernel, plan in prefix_plans(prefix_cases()[name], SM_COUNTS[gpu]).items():
        assert plan.programs >= SM_COUNTS[gpu], kernel


@pytest.mark.parametrize("batch, n_pos, dim, elem", [(64, 572, 4096, 2), (8, 2108, 4096, 2), (32, 316, 768, 4),
                                                     (32, 316, 768, 2), (1, 20, 40, 4)])
def test_dept_tiles_without_oversplitting(batch, n_pos, dim, elem):
    cfg = tiling.choose_tiles(batch, n_pos, dim, elem, 132)
    tiles = triton.cdiv(n_pos, cfg.block_t) * triton.cdiv(dim, cfg.block_d)
    assert cfg.block_d * elem <= 512 and cfg.block_d >= 16 and cfg.block_t >= 16  # tl.dot needs >= 16
    assert 1 <= cfg.groups <= batch
    if cfg.groups > 1:  # split only when the tiles alone leave SMs idle, and not further than needed
        assert (cfg.groups - 1) * tiles < tiling._PROGRAMS_PER_SM * 132
    if dim >= 128:  # every thread loads 4 x 16 bytes of each batch row
        assert cfg.block_t * cfg.block_d * elem == cfg.num_warps * 32 * 64


def test_backward_narrows_tiles_before_idling_sms():
    """T5-base bf16 (b 32): 512-byte tiles give 60 tiles and the partial-sum cap allows 2 groups, 120
    programs < 132 SMs, so the backward narrows its tiles to 256 bytes (and 2 warps) instead."""
    plan = plan_dept_backward(32, 316, 768, 2, False, 132)
    assert plan.meta["BLOCK_D"] * 2 == 256 and plan.meta["num_warps"] == 2 and plan.programs >= 132
    assert plan_dept_backward(32, 316, 768, 2, False, 108).meta["BLOCK_D"] * 2 == 512  # 120 >= 108


def test_max_groups_caps_the_split():
    assert tiling.choose_tiles(32, 316, 768, 4, 132).groups > 2
    assert tiling.choose_tiles(32, 316, 768, 4, 132, max_groups=2).groups == 2


def test_interpreter_never_splits_and_uses_wide_tiles():
    cfg = tiling.choose_tiles(64, 572, 40, 4, None)
    assert cfg.groups == 1 and cfg.block_d == 64


@pytest.mark.parametrize("rank, block", [(0, 16), (1, 16), (16, 16), (17, 32), (30, 32), (64, 64)])
def test_rank_padded_for_tl_dot(rank, block):
    assert tiling.rank_block(rank) == block


@pytest.mark.parametrize("name", ["llama7b-p100", "t5-base-bf16", "t5-base-fp32"])
def test_prefix_weight_tiles_cover_p_and_partials_stay_small(name):
    """W is read by one program per tile (the p tile covers p = 100), and the hidden gradient's fp32
    partial sums, written once and read once, move no more bytes than G."""
    case = prefix_cases()[name]
    n_out = case.layers * 2 * case.kv_heads * case.head_dim
    shape = (case.prefix_len, case.mid, n_out, case.head_dim)
    assert plan_prefix_kv_forward(*shape, case.dtype, 132).meta["BLOCK_P"] >= case.prefix_len
    _, hidden, n_per_split = plan_prefix_kv_backward(*shape, case.dtype.itemsize, case.dtype, 132)
    assert hidden.meta["BLOCK_P"] >= case.prefix_len
    splits = triton.cdiv(n_out, n_per_split)
    assert 2 * splits * case.prefix_len * case.mid * 4 <= case.prefix_len * n_out * case.dtype.itemsize


def test_dry_run_records_the_launch_instead_of_running():
    """Under dry_run the launcher plans for the stated SM count on meta tensors and records its launch."""
    meta = torch.device("meta")
    grad = torch.empty(32, 316, 768, dtype=torch.bfloat16, device=meta)
    ids = torch.empty(32, 256, dtype=torch.int64, device=meta)
    lora_A, lora_B = torch.empty(256, 30, device=meta), torch.empty(30, 768, device=meta)
    with tiling.dry_run(132) as launches:
        dept_backward(grad, ids, 32128, lora_A, lora_B, 1.0, 60, torch.float32, emb_dtype=None)
    assert len(launches) == 1
    kernel, plan, args = launches[0]
    assert kernel is _dept_bwd_kernel and plan == plan_dept_backward(32, 316, 768, 2, False, 132)
    assert args[0] is grad and args[1] is ids
    assert tiling._sm_count(meta) is None  # outside the dry run: no GPU plan for non-CUDA tensors
