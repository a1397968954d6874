"""Writers of small model files for tests: a Llama GGUF as llama.cpp lays it out, and checkpoint directories."""

from __future__ import annotations

import numpy as np

from jaxpaged.models.llama import MiniLLM
from jaxpaged.models.tokenizer import _bytes_to_unicode
from jaxpaged.models.weights import to_hf_tensors

_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _permute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of a Q or K projection (rotate-half -> interleaved pairs)."""
    rows, cols = weight.shape
    return weight.reshape(num_heads, 2, rows // num_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_llama_gguf(path: str, model: MiniLLM, *, architecture: str = "llama", quantize: dict | None = None,
                     chat_template: str | None = None) -> None:
    """Writes `model` as a GGUF file with a 256-byte vocabulary (plus <|endoftext|> as EOS).

    quantize: {tensor name suffix: GGMLQuantizationType} for tensors to store quantised.
    """
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(c.num_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    chars = _bytes_to_unicode()
    tokens = [chars[b] for b in range(256)] + ["<|endoftext|>"] + [f"<unused{i}>" for i in range(c.vocab_size - 257)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3] * (len(tokens) - 256))
    writer.add_token_merges([])
    writer.add_eos_token_id(256)
    if chat_template:
        writer.add_chat_template(chat_template)
    for name, value in to_hf_tensors(model).items():
        value = np.asarray(value, np.float32)
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            module = rest.rsplit(".", 1)[0]
            gguf_name = f"blk.{layer}.{_GGUF_NAMES[module]}.weight"
            if module == "self_attn.q_proj":
                value = _permute_rotary(value, c.num_heads)
            elif module == "self_attn.k_proj":
                value = _permute_rotary(value, c.num_kv_heads)
        qtype = next((q for suffix, q in (quantize or {}).items() if gguf_name.endswith(suffix)), None)
        if qtype is None:
            writer.add_tensor(gguf_name, value)
        else:
            try:
                data = gguf.quants.quantize(value, qtype)
            except (NotImplementedError, gguf.quants.QuantError):  # a type gguf cannot write: zero bytes of its size
                block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
                data = np.zeros((value.shape[0], value.shape[1] // block * block_bytes), np.uint8)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
