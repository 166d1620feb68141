"""Random inputs of the prefix K/V projection and its fp32 reference, shared by the op's CPU and GPU tests."""
import torch

from dept_fast.ops import prefix_kv_reference


def make_inputs(shape, dtype, device, seed=0):
    """Random (hidden, weight, bias) of a shape (num_layers, num_kv_heads, head_dim, prefix_len p, mid)."""
    layers, kv_heads, head_dim, p, mid = shape
    gen = torch.Generator().manual_seed(seed)
    n_out = layers * 2 * kv_heads * head_dim
    # H spans tanh's linear and saturated ranges; W and b at nn.Linear-like scale.
    hidden = 2 * torch.randn(p, mid, generator=gen)
    weight = torch.randn(n_out, mid, generator=gen) / mid ** 0.5
    bias = 0.1 * torch.randn(n_out, generator=gen)
    return [t.to(device, dtype) for t in (hidden, weight, bias)]


def reference_fp32(hidden, weight, bias, shape, grad_out):
    """The reference output and (dH, dW, db) for ``grad_out``, in fp32 on the same (rounded) inputs."""
    leaves = [t.detach().float().requires_grad_() for t in (hidden, weight, bias)]
    out = prefix_kv_reference(*leaves, *shape[:3])
    out.backward(grad_out.float())
    return out.detach(), [t.grad for t in leaves]
