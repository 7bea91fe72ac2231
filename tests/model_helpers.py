"""Shared helpers for the model tests: the tiny random LM they compose LLaVA checkpoints from."""

from __future__ import annotations


def tiny_llama(vocab_size: int, **config):
    """A random Llama LM of 2 layers, hidden 32, 2 attention heads sharing 1 KV head; ``config``
    adds or overrides LlamaConfig keys (tying, RoPE scaling, special token ids)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **(shape | config)))
