"""Tiny random models of several transformers families, for passes that must not depend on
module or architecture names, and their capture with norm weights moved away from 1."""
import torch

from qfx.capture import export, wrap_module

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=256, max_position_embeddings=128)


def family_model(name: str):
    import transformers as T

    torch.manual_seed(0)
    if name == "llama":  # GQA, tied embeddings
        return T.LlamaForCausalLM(T.LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=True))
    if name == "qwen2":  # q/k/v bias
        return T.Qwen2ForCausalLM(T.Qwen2Config(**SMALL, num_key_value_heads=2))
    if name == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**SMALL, num_key_value_heads=2))
    if name == "phi3":  # fused qkv_proj and gate_up_proj
        return T.Phi3ForCausalLM(T.Phi3Config(**SMALL, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                                              bos_token_id=1))
    if name == "gemma":  # (1 + weight) norms, scaled embedding, multi-query attention
        return T.GemmaForCausalLM(T.GemmaConfig(**SMALL, num_key_value_heads=1, head_dim=16))
    if name == "opt":  # LayerNorm with bias, pre-LN
        return T.OPTForCausalLM(T.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                            vocab_size=256, max_position_embeddings=128, word_embed_proj_dim=64))
    if name == "bert":  # post-LN: the LayerNorms also feed the residual
        return T.BertModel(T.BertConfig(**SMALL))
    raise KeyError(name)


def perturbed(model, dtype=torch.float32):
    """`model` in `dtype`, eval mode, with its 1-D weights (norms, biases) moved away from their
    initial values, so that a fold dividing them, or a rotation needing them fused, shows."""
    model = model.to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def captured(model, dtype):
    model = perturbed(model, dtype)
    bundle = wrap_module(model)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    example = (ids,) if bundle.kind == "causal_lm" else (ids, torch.ones_like(ids))
    return bundle, export(bundle, example), example


def outlier_llama():
    """qfx.examples.small_llama (hidden 128) with 4 channels of every norm's weight x50: the few
    huge activation channels of real LLMs, which random weights lack."""
    from qfx.examples import small_llama

    model = small_llama()
    scale = torch.ones(128)
    scale[torch.randperm(128, generator=torch.Generator().manual_seed(3))[:4]] = 50.0
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.mul_(scale)
            layer.post_attention_layernorm.weight.mul_(scale)
    return model
