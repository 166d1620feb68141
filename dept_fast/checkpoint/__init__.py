"""Checkpoint I/O: one config dataclass per method (``config.py``), crash-safe header-first files
(``files.py``), one reader per format (``dept.py``, ``prefix.py``, ``whole_model.py``)."""
from .config import DePTConfig, PrefixTuningConfig, StackConfig

__all__ = ["DePTConfig", "PrefixTuningConfig", "StackConfig"]
