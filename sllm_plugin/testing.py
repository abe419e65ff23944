"""Make small Hugging Face models offline: random weights from a config, a tokenizer trained in a
second. Used by the demo, the tests and the benchmarks (the hub is not reachable everywhere).

Needs the `hf` extra (transformers, tokenizers, safetensors) and torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: Named model shapes. "bench-2gb" is the ~2 GB bf16 Llama of the benchmarks (about the size
#: of Llama-3.2-1B); "tiny-*" are for tests (a few MB, fast on the vLLM CPU backend, whose
#: attention kernels need a head size of 32 or more: these use 64).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        architecture="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, vocab_size=512,
        tie_word_embeddings=False,
    ),
    "tiny-qwen2": dict(
        architecture="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, vocab_size=512,
        tie_word_embeddings=True,
    ),
    "small-llama": dict(
        architecture="llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, vocab_size=4096,
        tie_word_embeddings=False,
    ),
    "bench-2gb": dict(
        architecture="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=20,
        num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
        tie_word_embeddings=False,
    ),
}

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. ServerlessLLM loads checkpoints fast. "
    "vLLM serves large language models with paged attention. Hello world! 0123456789 "
    "def main():\n    return {'tokens': [1, 2, 3]}\n"
)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(directory: str | Path, vocab_size: int = 512) -> None:
    """Train a byte-level BPE tokenizer on a built-in corpus and save it (about a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<unk>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 50, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))


def make_random_model(
    directory: str | Path,
    preset: str = "tiny-llama",
    *,
    dtype: str = "bfloat16",
    seed: int = 0,
    max_shard_size: str = "1GB",
    **overrides: Any,
) -> Path:
    """Write a complete Hugging Face model directory with random weights; return its path.

    The model is built on the meta device, given real memory, filled with seeded random values
    and saved with `save_pretrained` (sharded safetensors, config, generation config, tokenizer).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    spec = {**PRESETS[preset], **overrides}
    arch = spec.pop("architecture")
    vocab = spec["vocab_size"]
    config = AutoConfig.for_model(
        arch, max_position_embeddings=2048, bos_token_id=0, eos_token_id=1, pad_token_id=3,
        **spec,
    )
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or ".norm" in name or "layernorm" in name:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * 0.05)
    if config.tie_word_embeddings:
        model.tie_weights()
    # Only parameters are saved; non-persistent buffers (rotary tables) never reach the files.
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), max_shard_size=max_shard_size)
    GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=3).save_pretrained(
        str(directory)
    )
    make_tokenizer(directory, vocab_size=min(vocab, 512))
    (directory / "sllm-random-model.json").write_text(
        json.dumps({"preset": preset, "dtype": dtype, "seed": seed, **overrides}) + "\n"
    )
    return directory
