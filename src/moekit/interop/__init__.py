"""Other libraries' MoE blocks to and from moekit's layers (transformers' Mixtral and Qwen3-MoE),
with equal outputs; transformers is optional (``pip install 'moekit[interop]'``)."""

from moekit.interop.transformers import (
                                         FAMILIES,
                                         from_transformers,
                                         to_transformers,
                                         transformers_block,
)

__all__ = ["FAMILIES", "from_transformers", "to_transformers", "transformers_block"]
