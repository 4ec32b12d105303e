"""GPT-2 and Llama from transformers as layer lists: nn.Sequential(*layers) equals the model, names map 1:1."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from ppll_ext.models.hf import hf_layers


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                                          bos_token_id=0, eos_token_id=0))
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                        max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_layers_equal_the_model_and_keep_its_names(kind: str) -> None:
    model = _model(kind).eval()
    x = torch.randint(0, 100, (2, 11))
    want = model(x).logits
    layers = hf_layers(model)
    assert torch.allclose(nn.Sequential(*layers)(x), want, atol=1e-6, rtol=0)
    names = [v for layer in layers for v in layer.hf_state_names().values()]
    assert sorted(names) == sorted(model.state_dict()) and len(names) == len(set(names))
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight is not model.get_input_embeddings().weight
