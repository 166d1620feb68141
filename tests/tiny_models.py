"""Tiny randomly initialised HuggingFace models built from configs (no hub downloads).

One builder per architecture family the library supports; tests/families.py names them as the
one matrix the model-level tests share. Every builder takes ``seed`` and config overrides (e.g.
``attn_implementation="eager"`` or dropout rates) and returns the model in eval mode.
"""
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          T5Config, T5ForConditionalGeneration)

VOCAB = 97  # prime, so no accidental power-of-two alignment


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    """2-layer GPT-2, d 40 (4 heads of 10): tied input/output embeddings, learned positions."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=40, n_layer=2, n_head=4,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """2-layer Llama with grouped-query attention (4 query heads, 2 key/value heads), d 48."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0), **overrides})
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    """2-layer Qwen2 with multi-query attention (4 query heads, 1 key/value head of 8), d 32: biased
    q/k/v projections, rotary positions, untied output embeddings, a per-layer-type mask mapping."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides)
    return Qwen2ForCausalLM(config).eval()


def tiny_t5(seed: int = 0, **overrides) -> T5ForConditionalGeneration:
    """2+2-layer T5, d 40, relative position buckets; decoder starts from the pad id 0."""
    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=40, d_kv=10, d_ff=80, num_layers=2, num_decoder_layers=2,
                      num_heads=4, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0, **overrides)
    return T5ForConditionalGeneration(config).eval()


def tiny_vllm_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """2-layer Llama that vLLM's CPU backend serves: head_dim 64 (its CPU attention refuses 16), d 256,
    grouped-query attention (4 query heads, 2 key/value heads)."""
    return tiny_llama(seed, **{"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "head_dim": 64, **overrides})
