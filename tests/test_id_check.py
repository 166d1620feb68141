"""``id_check``: how token ids (and update rows) outside their range are caught by ``dept_embedding``,
``dept_embedding_at_positions`` and ``FusedDePTEmbedding``.

"host" compares on the host (one synchronisation) and raises a ValueError naming the range found;
"device" queues ``torch._assert_async`` (a RuntimeError on CPU at once, a device-side assert on
CUDA) and makes no host synchronisation, so a training step can be captured in a CUDA graph. Both
fail loudly, in the fused kernel's path and the per-position one. CPU tests count the host
synchronisations the library's own code makes (through the Tensor-to-Python conversions); the gpu
tests capture a forward + backward in a CUDA graph and check CUDA's sync detector.
"""
import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from dept_fast import FusedDePTEmbedding, dept_embedding
from dept_fast.ops import dept_embedding_at_positions, dept_embedding_mixed

V, D, M, R, S = 50, 24, 3, 4, 16
LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(importlib.import_module(name).__file__)) + os.sep
                     for name in ("dept_fast", "dept_fast.kernels"))
HOST_CONVERSIONS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")
"""Tensor methods that hand a value to Python, i.e. wait for the device (on CUDA)."""


def module(id_check, device="cpu"):
    torch.manual_seed(0)
    mod = FusedDePTEmbedding(nn.Embedding(V, D).to(device), M, R, S, id_check=id_check)
    nn.init.normal_(mod.lora_B)
    return mod


def token_ids(bad=None):
    """(2, 7) random ids in [0, V), with ``bad`` at [1, 4] when given."""
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    if bad is not None:
        ids[1, 4] = bad
    return ids


@pytest.fixture
def host_syncs(monkeypatch):
    """Calls the library's own code (dept_fast, its kernels) makes to the Tensor methods that move a
    value to the host; every other caller (torch, Triton's interpreter) is ignored."""
    calls = []

    def counting(name, original):
        def method(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(LIBRARY_DIRS):
                calls.append(name)
            return original(self, *args, **kwargs)
        return method

    for name in HOST_CONVERSIONS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    return calls


@pytest.mark.parametrize("value", [V, -1], ids=["id=V", "negative-id"])
@pytest.mark.parametrize("positions", [False, True], ids=["fused", "per-position"])
def test_bad_ids_fail_loudly_in_both_modes(positions, value, monkeypatch):
    from dept_fast import kernels

    monkeypatch.setattr(kernels, "dept_forward", lambda *a, **k: pytest.fail("launched on bad input"))
    ids = token_ids(bad=value)
    rows = torch.arange(7).expand(2, 7) if positions else None
    with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, {V}\).*found values in \[.*{value}"):
        module("host")(ids, positions=rows)
    with pytest.raises(RuntimeError, match=rf"dept_fast: input_ids outside \[0, {V}\)"):
        module("device")(ids, positions=rows)


@pytest.mark.parametrize("id_check, error", [("host", ValueError), ("device", RuntimeError)])
def test_bad_update_rows_fail_loudly_in_both_modes(id_check, error):
    """The per-position path also checks each token's row of A (< max_length)."""
    mod = module(id_check)
    rows = torch.arange(7).expand(2, 7).clone()
    rows[0, 6] = S
    with pytest.raises(error, match=rf"token positions (must lie in|outside) \[0, {S}\)"):
        mod(token_ids(), positions=rows)


def test_unknown_id_check_is_refused():
    with pytest.raises(ValueError, match=r"id_check must be one of \('host', 'device'\), got 'gpu'"):
        FusedDePTEmbedding(nn.Embedding(V, D), M, R, S, id_check="gpu")
    with pytest.raises(ValueError, match="id_check must be one of"):
        dept_embedding(token_ids(), torch.randn(V, D), torch.randn(M, D), torch.randn(S, R), torch.randn(R, D), 1.0,
                       id_check="gpu")


@pytest.mark.parametrize("positions", [False, True], ids=["fused", "per-position"])
def test_device_check_makes_no_host_sync(positions, host_syncs):
    """Forward and backward of the module: the host check converts the id range to Python (the
    counter sees it), the device check never does, and both give the same numbers."""
    ids = token_ids()
    rows = torch.arange(7).expand(2, 7) if positions else None
    results = {}
    for id_check in ("host", "device"):
        mod = module(id_check)
        del host_syncs[:]
        out = mod(ids, positions=rows)
        out.square().mean().backward()
        results[id_check] = [out.detach()] + [p.grad for p in (mod.prompt, mod.lora_A, mod.lora_B)]
        if id_check == "host":
            assert host_syncs, "the counter saw no host conversion of the host check"
        else:
            assert host_syncs == []
    for host, device in zip(results["host"], results["device"]):
        assert torch.equal(host, device)


@pytest.mark.parametrize("id_check", ["host", "device"])
def test_meta_tensors_give_a_meta_result_unchecked(id_check):
    """``meta`` tensors (shape inference, deferred initialisation) hold no values: no id is checked
    and every op returns a meta tensor of the stage's shape and E's dtype."""
    meta = torch.device("meta")
    ids = torch.zeros(2, 7, dtype=torch.long, device=meta)
    weight = torch.empty(V, D, dtype=torch.bfloat16, device=meta)
    prompt, lora_A, lora_B = (torch.empty(*shape, device=meta) for shape in ((M, D), (S, R), (R, D)))
    args = (weight, prompt, lora_A, lora_B, 2.0)
    kwargs = dict(id_check=id_check, embed_scale=3.0)
    outs = {
        "fused": dept_embedding(ids, *args, **kwargs),
        "per-position": dept_embedding_at_positions(ids, ids, *args, **kwargs),
        "mixed": dept_embedding_mixed(ids, torch.zeros(2, dtype=torch.long, device=meta), weight, [prompt, prompt[:1]],
                                      [lora_A, lora_A[:, :2]], [lora_B, lora_B[:2]], [2.0, 1.0], **kwargs),
        "mixed-per-position": dept_embedding_mixed(ids, None, weight, [prompt], [lora_A], [lora_B], [2.0],
                                                   positions=ids, **kwargs),
        "module": FusedDePTEmbedding(nn.Embedding(V, D, device=meta), M, R, S, id_check=id_check,
                                     embed_scale=3.0)(ids),
    }
    for name, out in outs.items():
        dtype = torch.float32 if name == "module" else torch.bfloat16
        assert out.device == meta and out.shape == (2, M + 7, D) and out.dtype == dtype, name


# --- CUDA ------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_sync_detector_sees_only_the_host_check():
    """CUDA's own sync detector: the host check synchronises, the device check's forward and backward
    do not."""
    ids = token_ids().cuda()
    for id_check in ("host", "device"):
        mod = module(id_check, "cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            if id_check == "host":
                with pytest.raises(RuntimeError, match="synchroniz"):
                    mod(ids)
            else:
                mod(ids).float().square().mean().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_of_forward_and_backward_replays_eager_numbers(dtype):
    """Capture forward + backward of FusedDePTEmbedding(id_check="device") once, replay it on new ids
    and output gradients: the output and dP, dA, dB equal an eager call's (same kernels; the P/A/B
    gradients are bit-deterministic)."""
    torch.manual_seed(0)
    mod = FusedDePTEmbedding(nn.Embedding(997, 96).to("cuda", dtype), 5, 6, 40, id_check="device")
    nn.init.normal_(mod.lora_B)
    params = [mod.prompt, mod.lora_A, mod.lora_B]
    static_ids = torch.randint(0, 997, (4, 33), device="cuda")
    static_grad = torch.randn(4, 5 + 33, 96, device="cuda", dtype=dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: Triton compiles, autograd allocates
        for _ in range(3):
            mod.zero_grad(set_to_none=True)
            mod(static_ids).backward(static_grad)
    torch.cuda.current_stream().wait_stream(side)
    mod.zero_grad(set_to_none=True)  # the captured backward allocates the gradients in the graph's pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = mod(static_ids)
        static_out.backward(static_grad)
    gen = torch.Generator("cuda").manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, 997, (4, 33), device="cuda", generator=gen)
        grad = torch.randn(static_grad.shape, device="cuda", dtype=dtype, generator=gen)
        static_ids.copy_(ids)
        static_grad.copy_(grad)
        graph.replay()
        eager = mod(ids)
        eager_grads = torch.autograd.grad(eager, params, grad)
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager)
        for name, p, want in zip(("prompt", "lora_A", "lora_B"), params, eager_grads):
            assert torch.equal(p.grad, want), name


@pytest.mark.gpu
def test_cuda_device_check_fails_loudly():
    """A bad id under the device check stops the program (a device-side assert; run in a child
    process, since it poisons the CUDA context)."""
    script = textwrap.dedent(f"""
        import torch
        from torch import nn
        from dept_fast import FusedDePTEmbedding
        mod = FusedDePTEmbedding(nn.Embedding({V}, {D}).cuda(), {M}, {R}, {S}, id_check="device")
        ids = torch.zeros(2, 7, dtype=torch.long, device="cuda")
        ids[1, 4] = {V}
        mod(ids)
        torch.cuda.synchronize()
        print("NO ERROR")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "NO ERROR" not in done.stdout
    assert "assert" in done.stderr.lower(), done.stderr[-2000:]

