"""The few-rows expert path of a lone decode (and a decode batch of two) equals transformers' own kernel."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from qllm_core.models.experts import ExpertKernel


@pytest.mark.parametrize("tokens", [1, 2])
def test_few_rows_equals_the_models_own_experts(tokens: int) -> None:
    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
    block = MixtralSparseMoeBlock(config).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    kernel = ExpertKernel(block.experts, "mixtral")
    with torch.inference_mode():
        for _ in range(5):  # several routings: both slots, different experts
            hidden = torch.randn(tokens, 32)
            _, weights, index = block.gate(hidden)
            expected = block.experts(hidden, index, weights)
            torch.testing.assert_close(kernel.few_rows(hidden, index, weights), expected, rtol=1e-6, atol=1e-6)
