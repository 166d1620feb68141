"""Tiny randomly initialised HuggingFace models built from configs (no hub downloads).

One builder per architecture family of the matrix (tests/families.py). Every builder takes ``seed``
and config overrides (e.g. ``attn_implementation="eager"`` or dropout rates) and returns the model
in eval mode. Sizes are the smallest that keep each family's distinguishing traits: grouped- and
multi-query attention, sliding windows, embedding scales inside the embedding module (Gemma, BART
with ``scale_embedding``) or in the stack's forward (Pegasus), stacks called directly by the LM
head's forward (OPT, BartForCausalLM), relative positions (T5), legacy attention (BLOOM, Falcon).
"""
import torch
import transformers
from torch import nn

VOCAB = 97  # prime, so no accidental power-of-two alignment
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _build(config_class: str, model_class: str, seed: int, defaults: dict, overrides: dict) -> nn.Module:
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**{"vocab_size": VOCAB, **TOKENS, **defaults, **overrides})
    return getattr(transformers, model_class)(config).eval()


# Rotary decoders with q/k/v heads (hidden 32 or 48, 2 layers, max 256 positions).
_ROTARY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)
# BART-like encoder-decoders (and BART's causal decoder): d 32, 2 + 2 layers, 4 heads.
_BART = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256, forced_eos_token_id=None)


def tiny_gpt2(seed: int = 0, **overrides) -> nn.Module:
    """2-layer GPT-2, d 40 (4 heads of 10): tied input/output embeddings, learned positions."""
    return _build("GPT2Config", "GPT2LMHeadModel", seed, dict(n_positions=128, n_embd=40, n_layer=2, n_head=4),
                  overrides)


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    """2-layer Llama with grouped-query attention (4 query heads, 2 key/value heads), d 48."""
    return _build("LlamaConfig", "LlamaForCausalLM", seed, {**_ROTARY, "hidden_size": 48, "intermediate_size": 96},
                  overrides)


def tiny_qwen2(seed: int = 0, **overrides) -> nn.Module:
    """2-layer Qwen2 with multi-query attention (4 query heads, 1 key/value head of 8), d 32: biased
    q/k/v projections, rotary positions, untied output embeddings, a per-layer-type mask mapping."""
    return _build("Qwen2Config", "Qwen2ForCausalLM", seed, {**_ROTARY, "num_key_value_heads": 1}, overrides)


def tiny_mistral(seed: int = 0, **overrides) -> nn.Module:
    """2-layer Mistral with a sliding window of 16 positions (narrower than the tests' m + max_length)."""
    return _build("MistralConfig", "MistralForCausalLM", seed, {**_ROTARY, "sliding_window": 16}, overrides)


def tiny_qwen3(seed: int = 0, **overrides) -> nn.Module:
    """2-layer Qwen3: q/k RMS norms, head_dim 8 set apart from hidden / heads."""
    return _build("Qwen3Config", "Qwen3ForCausalLM", seed, {**_ROTARY, "head_dim": 8}, overrides)


def tiny_phi3(seed: int = 0, **overrides) -> nn.Module:
    """2-layer Phi3: fused qkv and gate/up projections."""
    return _build("Phi3Config", "Phi3ForCausalLM", seed, dict(_ROTARY), overrides)


def tiny_gemma(seed: int = 0, **overrides) -> nn.Module:
    """2-layer Gemma: the embedding module multiplies its rows by sqrt(hidden) in its own forward."""
    return _build("GemmaConfig", "GemmaForCausalLM", seed, {**_ROTARY, "head_dim": 8}, overrides)


def tiny_gemma2(seed: int = 0, **overrides) -> nn.Module:
    """2-layer Gemma2 (eager attention with logit soft-capping), scaled embeddings, a sliding layer
    whose window (64) covers every test sequence."""
    return _build("Gemma2Config", "Gemma2ForCausalLM", seed, {**_ROTARY, "head_dim": 8, "sliding_window": 64},
                  overrides)


def tiny_gemma3(seed: int = 0, **overrides) -> nn.Module:
    """2-layer Gemma3 text model: one sliding (window 64) and one full attention layer, q/k norms,
    scaled embeddings."""
    return _build("Gemma3TextConfig", "Gemma3ForCausalLM", seed,
                  {**_ROTARY, "head_dim": 8, "sliding_window": 64,
                   "layer_types": ["sliding_attention", "full_attention"]}, overrides)


def tiny_olmo2(seed: int = 0, **overrides) -> nn.Module:
    """2-layer OLMo2: norms after attention and MLP, q/k norms."""
    return _build("Olmo2Config", "Olmo2ForCausalLM", seed, dict(_ROTARY), overrides)


def tiny_gpt_neox(seed: int = 0, **overrides) -> nn.Module:
    """2-layer GPT-NeoX: fused qkv, partial rotary, parallel residual."""
    return _build("GPTNeoXConfig", "GPTNeoXForCausalLM", seed,
                  dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=256), overrides)


def tiny_opt(seed: int = 0, **overrides) -> nn.Module:
    """2-layer OPT: learned positions; ``OPTForCausalLM.forward`` calls ``model.decoder``, not ``model``."""
    return _build("OPTConfig", "OPTForCausalLM", seed,
                  dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=256, word_embed_proj_dim=32), overrides)


def tiny_falcon(seed: int = 0, **overrides) -> nn.Module:
    """2-layer Falcon (rotary, multi-query): attention outside transformers' AttentionInterface."""
    return _build("FalconConfig", "FalconForCausalLM", seed,
                  dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256),
                  overrides)


def tiny_bloom(seed: int = 0, **overrides) -> nn.Module:
    """2-layer BLOOM (ALiBi): attention outside transformers' AttentionInterface."""
    return _build("BloomConfig", "BloomForCausalLM", seed, dict(hidden_size=32, n_layer=2, n_head=4), overrides)


def tiny_bart_causal(seed: int = 0, **overrides) -> nn.Module:
    """BART's decoder as a causal LM: scaled embeddings, positions from the cache length (its forward
    takes no position_ids), ``forward`` calls ``model.decoder``; labels are not shifted by the model."""
    return _build("BartConfig", "BartForCausalLM", seed,
                  {**_BART, "scale_embedding": True, "is_decoder": True, "is_encoder_decoder": False}, overrides)


def tiny_t5(seed: int = 0, **overrides) -> nn.Module:
    """2+2-layer T5, d 40, relative position buckets; decoder starts from the pad id 0."""
    return _build("T5Config", "T5ForConditionalGeneration", seed,
                  dict(d_model=40, d_kv=10, d_ff=80, num_layers=2, num_decoder_layers=2, num_heads=4,
                       decoder_start_token_id=0), overrides)


def tiny_bart(seed: int = 0, **overrides) -> nn.Module:
    """2+2-layer BART with ``scale_embedding`` (the embedding module scales by sqrt(d))."""
    return _build("BartConfig", "BartForConditionalGeneration", seed,
                  {**_BART, "scale_embedding": True, "decoder_start_token_id": 2}, overrides)


def tiny_mbart(seed: int = 0, **overrides) -> nn.Module:
    """2+2-layer mBART (pre-norm, final layer norms), scaled embeddings."""
    return _build("MBartConfig", "MBartForConditionalGeneration", seed,
                  {**_BART, "scale_embedding": True, "decoder_start_token_id": 2}, overrides)


def tiny_m2m100(seed: int = 0, **overrides) -> nn.Module:
    """2+2-layer M2M100 (sinusoidal positions), scaled embeddings."""
    return _build("M2M100Config", "M2M100ForConditionalGeneration", seed,
                  {**_BART, "scale_embedding": True, "decoder_start_token_id": 2}, overrides)


def tiny_pegasus(seed: int = 0, **overrides) -> nn.Module:
    """2+2-layer Pegasus with ``scale_embedding``: the scale is applied in the stacks' forward, outside
    the embedding module, and only when the stack embeds ``input_ids`` itself."""
    return _build("PegasusConfig", "PegasusForConditionalGeneration", seed,
                  {**_BART, "scale_embedding": True, "decoder_start_token_id": 0}, overrides)


def tiny_marian(seed: int = 0, **overrides) -> nn.Module:
    """2+2-layer Marian (sinusoidal positions, post-norm), scaled embeddings."""
    return _build("MarianConfig", "MarianMTModel", seed,
                  {**_BART, "scale_embedding": True, "decoder_start_token_id": 0, "pad_token_id": 0}, overrides)


def tiny_vllm_llama(seed: int = 0, **overrides) -> nn.Module:
    """2-layer Llama that vLLM's CPU backend serves: head_dim 64 (its CPU attention refuses 16), d 256,
    grouped-query attention (4 query heads, 2 key/value heads)."""
    return tiny_llama(seed, **{"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "head_dim": 64, **overrides})
