"""transformers integration: logits equal those of from_pretrained on the original."""

from __future__ import annotations

import pytest
import torch

from sllm_plugin import convert
from sllm_plugin.hf import load_model
from sllm_plugin.loader import LoadStats


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_logits_equal_from_pretrained(preset, tmp_path):
    from transformers import AutoModelForCausalLM

    from sllm_plugin.testing import make_random_model

    src = make_random_model(tmp_path / preset, preset, seed=5)
    ckpt = convert(src, tmp_path / f"{preset}.sllm", quiet=True)
    reference = AutoModelForCausalLM.from_pretrained(src).eval()
    stats = LoadStats()
    model = load_model(ckpt, stats=stats)
    assert stats.bytes > 0
    ids = torch.tensor([[0, 5, 9, 200, 33, 7]])
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, model(ids).logits)
    if preset == "tiny-qwen2":  # tied embeddings stay tied
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    as_fp32 = load_model(ckpt, dtype=torch.float32)
    assert as_fp32.model.embed_tokens.weight.dtype == torch.float32
