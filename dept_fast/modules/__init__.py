"""The nn.Modules: the DePT embedding stage, the Prefix-Tuning encoder and its per-model container."""
from .dept_embedding import FusedDePTEmbedding
from .prefix_encoder import FusedPrefixEncoder, grouped_key_values
from .prefix_tuning import PrefixTuning

__all__ = ["FusedDePTEmbedding", "FusedPrefixEncoder", "PrefixTuning", "grouped_key_values"]
