"""Shared helpers for the model tests: the tiny random LMs they compose LLaVA checkpoints from."""

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


def sentencepiece_style_llama(folder, chatml: bool = False):
    """A tiny Llama LM with a Mistral/Llama-style tokenizer: byte-fallback BPE over "▁"-marked
    words, <s>/</s> specials and BOS added by the tokenizer (SmolLM2's GPT-2 style tokenizer has
    none of these, so the mistral template's BOS and "</s>" handling is checked here). With
    ``chatml``, the tokenizer also has <|im_start|>/<|im_end|> tokens (model init refuses the
    chatml template on a tokenizer without them)."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for ch in "▁" + string.ascii_letters + string.digits + ".,?!:;'\"()[]/-+<>":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    fast = LlamaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
    )
    if chatml:
        fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder
