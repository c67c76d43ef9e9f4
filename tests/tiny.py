"""Tiny random models of the supported architectures, for fast tests.

Each exercises one thing the passes must get right: GQA, tied embeddings, q/k/v biases
(Qwen2), and a hidden size that is not a power of two.
"""

from __future__ import annotations

TINY_MODELS = {
    # name: (model_type, config overrides)
    "llama-gqa": ("llama", dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                                tie_word_embeddings=False)),
    "llama-tied": ("llama", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                                 tie_word_embeddings=True)),
    "qwen2-bias": ("qwen2", dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=False)),
    # 48 = 12 * 4 (Paley), 3 heads of 16: head mixing needs the orthogonal fallback; d_ff 80 = 20 * 4
    "llama-odd": ("llama", dict(hidden_size=48, intermediate_size=80, num_attention_heads=3, num_key_value_heads=1,
                                tie_word_embeddings=True)),
}

# One tiny model per family of onnxqf.recognize.families (tests/test_families.py): hidden 64, 4 heads of 16,
# 2 KV heads, d_ff 96, and each family's own parts switched on.
_SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
_IDS = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)  # the families' defaults lie outside a 512 vocabulary
FAMILY_MODELS = {
    "qwen3": ("qwen3", dict(_SHAPE, tie_word_embeddings=False)),  # per-head q/k norms
    # packed qkv_proj and gate_up_proj, partial rotary, LongRoPE (Phi-3-128k, Phi-4-mini); 2 heads of 32, so that
    # the rotary half (16) gives ONNX Runtime's GroupQueryAttention a cos cache width that is a multiple of 8.
    # "type" repeats "rope_type": onnxruntime-genai 0.18's builder reads the key transformers 4 wrote
    "phi3": ("phi3", dict(_SHAPE, num_attention_heads=2, num_key_value_heads=1, head_dim=32, partial_rotary_factor=0.5,
                          original_max_position_embeddings=256, rope_parameters={
                              "rope_type": "longrope", "type": "longrope", "rope_theta": 10000.0,
                              "original_max_position_embeddings": 256, "short_factor": [1.0] * 8,
                              "long_factor": [1.0 + i / 4 for i in range(8)]}, **_IDS)),
    "gemma": ("gemma", dict(_SHAPE, **_IDS)),  # (1 + γ) norms, embedding × √hidden, GeGLU, tied
    # + norms after the blocks, soft-capping; a window (16) shorter than the tests' 32-token windows and prompts, so
    # that the local layers' sliding window bites (onnxruntime-genai's folder keeps a sliding-window cache there)
    "gemma2": ("gemma2", dict(_SHAPE, sliding_window=16, **_IDS)),
    "gemma3": ("gemma3_text", dict(_SHAPE, sliding_window=64, **_IDS)),  # + q/k norms
    "granite": ("granite", dict(_SHAPE, embedding_multiplier=12.0, residual_multiplier=0.22,
                                attention_multiplier=0.0625, logits_scaling=8.0, **_IDS)),
    "smollm3": ("smollm3", dict(_SHAPE, no_rope_layer_interval=2, **_IDS)),  # every second layer without rotary
    "ernie4_5": ("ernie4_5", dict(_SHAPE, **_IDS)),  # the Llama pattern (interleaved rotary, tied)
    "mistral": ("mistral", dict(_SHAPE, sliding_window=None, **_IDS)),  # the Llama pattern (no window: v0.2 and later)
    "hunyuan": ("hunyuan_v1_dense", dict(_SHAPE, **_IDS)),  # per-head q/k norms after rotary
    "seed_oss": ("seed_oss", dict(_SHAPE, **_IDS)),  # the Llama pattern with q/k/v biases
    "internlm3": ("internlm3", dict(_SHAPE, **_IDS)),  # the Llama pattern
    "glm": ("glm", dict(_SHAPE, **_IDS)),  # packed gate_up, partial interleaved rotary
    # a short gated convolution layer, then an attention layer with per-head q/k norms; tied; d_ff 256 (LFM2 adjusts
    # intermediate_size: 2/3 of it, rounded up to a multiple of 256)
    "lfm2": ("lfm2", dict(_SHAPE, layer_types=["conv", "full_attention"], **_IDS)),
    # LayerNorms without parameters (centred into RMSNorms); its outliers are in the embedding (NO_NORM_SCALES)
    "olmo": ("olmo", dict(_SHAPE, **_IDS)),
}
TINY_MODELS.update(FAMILY_MODELS)
# OLMo 1.7's clip_qkv (q/k/v clamped: 2.5 clamps 5% of the tiny model's values, its logits move by 19%), and
# biases on q/k/v/o (o_proj's is centred)
TINY_MODELS["olmo-clip"] = ("olmo", dict(_SHAPE, clip_qkv=2.5, attention_bias=True, **_IDS))
# families without norm scales: the outlier channels are put in the embedding instead (they reach every norm's
# output), and the weights scaled up from the 0.02 initialization (else the logits are nearly uniform)
NO_NORM_SCALES = {"olmo"}


def tiny_model(name: str, seed: int = 0, layers: int = 2, vocab: int = 512):
    """A randomly initialised HF causal LM; weights get a few outlier channels like real LLMs."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides = TINY_MODELS[name]
    config = AutoConfig.for_model(
        model_type, num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=512, **overrides
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name_, p in model.named_parameters():
            if "norm" in name_:
                # non-trivial norm scales, with a few large channels (as in real models)
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
                p[: max(1, p.numel() // 16)] *= 8.0
            elif p.ndim == 1:  # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif model_type in NO_NORM_SCALES and "embed_tokens" in name_:
                # unit rows with a few large channels (the residual stream's outliers, which every norm passes on)
                p.copy_(torch.randn(p.shape, generator=g))
                p[:, : max(1, p.shape[1] // 16)] *= 8.0
            elif model_type in NO_NORM_SCALES:  # weights of about 1/√fan_in, so that the logits are not uniform
                p.mul_(8.0)
    return model


def save_byte_tokenizer(directory) -> None:
    """A byte-level BPE tokenizer without merges (257 ids): the model builder needs tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(str(directory))
