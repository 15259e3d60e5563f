"""Built-in tiny models for demos and tests: random weights, fixed seeds, no downloads.

Use them from a spec as `model: {factory: "qfx.examples:tiny_llama"}`."""
from __future__ import annotations

import torch


def tiny_llama(seed: int = 0):
    """A 2-layer Llama with GQA and tied embeddings (the layout of real Llama checkpoints)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def small_llama(seed: int = 0):
    """tiny_llama at hidden 128 / intermediate 256: wide enough for int4 groups of 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0):
    """A 2-layer BERT encoder (the layout of MiniLM)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=256, max_position_embeddings=128)
    torch.manual_seed(seed)
    return BertModel(config).eval()


class TinyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(32, 64)
        self.down = torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def tiny_mlp(seed: int = 0):
    """A plain nn.Module with example inputs: what a factory returns for non-HF models."""
    torch.manual_seed(seed)
    return TinyMLP().eval(), (torch.randn(4, 32),)
