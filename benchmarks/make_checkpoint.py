"""Random-weight checkpoints with the dimensions of real MoE models, for benchmarks on a GPU (not a test).

Nothing is downloaded: the config is written out here, the weights are random, and the tokenizer is the
built-in byte-level BPE, so the vocabulary is that tokenizer's (512) rather than the real model's. Every
other dimension is the real model's; `--layers` keeps the first N decoder layers, which keeps per-layer
figures real while the checkpoint stays quick to write and load.

Run: `python -m benchmarks.make_checkpoint olmoe-1b-7b /tmp/olmoe --layers 4 --device cuda --dtype bfloat16`,
then point any benchmark's `--model` at the directory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, OlmoeConfig, PretrainedConfig, Qwen2MoeConfig

from benchmarks.script_args import count, script_parser
from qllm_core.models.builtin import build_tokenizer

VOCAB = 512
# What the built-in tokenizer fixes in every shape: its vocabulary and <|endoftext|> (id 0) as EOS and padding.
_BUILTIN_TOKENIZER: dict[str, Any] = {
    "vocab_size": VOCAB,
    "tie_word_embeddings": False,
    "eos_token_id": 0,
    "pad_token_id": 0,
    "bos_token_id": None,
}

_SHARED: dict[str, Any] = {
    "hidden_size": 2048,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "norm_topk_prob": False,
    **_BUILTIN_TOKENIZER,
}
"""What both published shapes have alike."""


@dataclass(frozen=True)
class Shape:
    """A published model's config family and dimensions; called with a depth, its config."""

    family: Callable[..., PretrainedConfig]
    dims: Mapping[str, Any]
    full_depth: int

    def __call__(self, layers: int) -> PretrainedConfig:
        return self.family(num_hidden_layers=layers, **_SHARED, **self.dims)


# The published configs' shapes (allenai/OLMoE-1B-7B-0924, Qwen/Qwen1.5-MoE-A2.7B), vocabulary aside.
SHAPES: dict[str, Shape] = {
    "olmoe-1b-7b": Shape(
        OlmoeConfig,
        {"intermediate_size": 1024, "num_experts": 64, "num_experts_per_tok": 8, "max_position_embeddings": 4096},
        full_depth=16,
    ),
    "qwen1.5-moe-a2.7b": Shape(
        Qwen2MoeConfig,
        {
            "intermediate_size": 5632,
            "moe_intermediate_size": 1408,
            "shared_expert_intermediate_size": 5632,
            "num_experts": 60,
            "num_experts_per_tok": 4,
            "max_position_embeddings": 8192,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "qkv_bias": True,
        },
        full_depth=24,
    ),
}
FULL_DEPTH = {name: shape.full_depth for name, shape in SHAPES.items()}


def build_checkpoint(config: PretrainedConfig, out: Path, device: str = "cpu", dtype: str = "bfloat16") -> Path:
    """Initialise `config` randomly on `device` (a GPU initialises billions of weights in seconds) and save
    it with the built-in tokenizer into `out`, loadable by `from_pretrained` like any checkpoint."""
    tokenizer = build_tokenizer(VOCAB)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    """Build one checkpoint from the command line."""
    parser = script_parser(__doc__)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path, help="directory to write")
    parser.add_argument("--layers", type=count, default=None, help="decoder layers (default: the real depth)")
    parser.add_argument("--device", default="cpu", help="where to initialise the weights: cpu, cuda")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16, float16, float32")
    args = parser.parse_args()
    layers = args.layers if args.layers is not None else FULL_DEPTH[args.shape]
    build_checkpoint(SHAPES[args.shape](layers), args.out, args.device, args.dtype)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
