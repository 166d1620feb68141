"""The ops: each autograd Function over the Triton kernels, validated, with its PyTorch reference
beside it (``*_reference.py``: what tests and benchmarks compare with, and the path on plain CPU)."""
from .dept_embedding_op import (DePTEmbeddingFunction, dept_embedding, dept_embedding_at_positions,
                                dept_embedding_mixed, pack_adapters)
from .dept_embedding_reference import dept_embedding_mixed_reference, dept_embedding_reference
from .prefix_attention_reference import prefix_attention_reference
from .prefix_kv_op import (GroupedPrefixKVFunction, PrefixKVFunction, grouped_launch_available,
                           grouped_prefix_kv_projection, prefix_kv_projection)
from .prefix_kv_reference import grouped_prefix_kv_reference, prefix_kv_reference

__all__ = ["DePTEmbeddingFunction", "dept_embedding", "dept_embedding_at_positions", "dept_embedding_mixed",
           "pack_adapters", "dept_embedding_reference", "dept_embedding_mixed_reference",
           "PrefixKVFunction", "prefix_kv_projection", "prefix_kv_reference", "prefix_attention_reference",
           "GroupedPrefixKVFunction", "grouped_prefix_kv_projection", "grouped_prefix_kv_reference",
           "grouped_launch_available"]
