"""Triton kernels and their launchers (no nn.Modules here). Installed as ``dept_fast.kernels``."""
from .adapter_rows import AdapterRows, sort_rows
from .dept_backward import dept_backward
from .dept_forward import dept_forward
from .prefix_kv import (PrefixKVBlocks, grouped_prefix_kv_backward, grouped_prefix_kv_forward, prefix_kv_backward,
                        prefix_kv_forward)
from .tiling import TileConfig, choose_tiles

__all__ = ["dept_forward", "dept_backward", "AdapterRows", "sort_rows", "TileConfig", "choose_tiles",
           "prefix_kv_forward", "prefix_kv_backward", "grouped_prefix_kv_forward",
           "grouped_prefix_kv_backward", "PrefixKVBlocks"]
