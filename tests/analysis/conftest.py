"""A tiny untrained MoE language model for the layer-analysis tests."""

import pytest

from moekit.nn.lm import LMConfig, MoETransformerLM


@pytest.fixture
def lm(gen):
    """2 layers of 4 experts, width 16, in eval mode."""
    config = LMConfig(d_model=16, n_layers=2, n_heads=2, n_experts=4, expert_hidden=16,
                      max_seq_len=32)
    return MoETransformerLM(config, generator=gen).eval()
