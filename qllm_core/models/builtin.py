"""Built-in models with random weights and a real BPE tokenizer, saved like any checkpoint.

`tiny` is the default (fast on a laptop CPU, used by the tests); `bench` is the same family big enough
that one BE prefill takes hundreds of milliseconds on two CPU cores. Both are built on first use
with fixed seeds, written with `save_pretrained` into a cache directory, and then loaded through the
same `from_pretrained` path as a real checkpoint. Nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

BUILD_VERSION = 1
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Training text for the tokenizer: enough English and code for a BPE with sensible merges.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A serving system keeps latency-sensitive requests fast
while best-effort requests fill the hardware. Mixture-of-Experts models route every token to a few
experts; each expert is a small feed-forward network. Hello, world! How are you today? I am fine,
thank you. The weather is nice and the sun is shining. def forward(self, x): return self.linear(x)
import torch; from transformers import AutoModel. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.
Once upon a time there was a little model that wanted to answer questions quickly and correctly.
""".strip()


@dataclass(frozen=True)
class Preset:
    """Shape of a built-in model."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    vocab_size: int = 512
    max_position_embeddings: int = 4096
    initializer_range: float = 0.1


PRESETS = {
    "tiny": Preset("tiny", 64, 128, 4, 4, 2, 8, 2),
    "bench": Preset("bench", 512, 1024, 8, 8, 4, 8, 2, initializer_range=0.05),
}


def cache_root() -> Path:
    """Where built models live: $QLLM_CACHE_DIR, else ~/.cache/qllm."""
    return Path(os.environ.get("QLLM_CACHE_DIR") or Path.home() / ".cache" / "qllm")


def ensure_builtin(name: str) -> Path:
    """Directory of a built-in model, building it on first use (safe against concurrent builders)."""
    preset = PRESETS[name]
    target = cache_root() / "models" / f"{name}-v{BUILD_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(preset, staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").exists():  # another process won the race only if it finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the built-in text: every UTF-8 string encodes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(preset: Preset, directory: Path) -> None:
    """Write a random-weight Mixtral-family checkpoint and its tokenizer into `directory`."""
    tokenizer = build_tokenizer(preset.vocab_size)
    config = MixtralConfig(
        vocab_size=preset.vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        num_local_experts=preset.num_local_experts,
        num_experts_per_tok=preset.num_experts_per_tok,
        max_position_embeddings=preset.max_position_embeddings,
        initializer_range=preset.initializer_range,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
