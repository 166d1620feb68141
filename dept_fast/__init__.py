"""dept_fast: fused Triton kernels for DePT and Prefix-Tuning soft-prompt fine-tuning.

    from dept_fast import FusedDePTEmbedding
"""
import os as _os

# Installed, ``dept_fast.kernels`` comes from the top-level ``kernels/`` folder (setup.py
# package_dir). Run from a source checkout without installing (``PYTHONPATH=.``), find it there.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and \
        _os.path.isfile(_os.path.join(_checkout, "kernels", "dept_forward.py")):
    __path__.append(_checkout)

from .embedding import FusedDePTEmbedding  # noqa: E402
from .functional import DePTEmbeddingFunction, dept_embedding  # noqa: E402
from .reference import dept_embedding_reference  # noqa: E402
from .budget import budget  # noqa: E402
from .hf_dept import apply_dept, load_dept  # noqa: E402
from .optim import param_groups  # noqa: E402
from .prefix_encoder import FusedPrefixEncoder  # noqa: E402
from .prefix_tuning import apply_prefix_tuning, load_prefix_tuning  # noqa: E402

__all__ = ["FusedDePTEmbedding", "DePTEmbeddingFunction", "dept_embedding", "dept_embedding_reference",
           "apply_dept", "load_dept", "param_groups", "budget",
           "FusedPrefixEncoder", "apply_prefix_tuning", "load_prefix_tuning"]
__version__ = "0.1.0"
