"""import_gguf on a tiny llama GGUF file written here with the `gguf` package, offline, in seconds.

The real-model test (tests/e2e/test_real_model.py) imports a 135M GGUF and is in the extended
tier, so a broken import (config.dtype set to a function, once) could pass CI. This file builds
the same kind of file llama.cpp writes -- llama architecture, fp32 tensors, q/k rows in llama.cpp's
rotary order, a byte-level BPE tokenizer and a chat template in the metadata -- with known random
weights, imports it, and checks the directory from the outside: it loads with the Auto classes,
carries no quantization_config, is stored in the requested dtype, holds the written weights
(q/k back in Hugging Face order), computes what a Llama built directly from them computes, and
its tokenizer splits and restores text as the file's merges say.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ray_dpo.gguf_import import MARKER, GGUFImportError, import_gguf

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 16, 2, 2, 1, 32, 64
HEAD_DIM = HIDDEN // HEADS
RMS_EPS, ROPE_THETA = 1e-5, 10000.0

# Byte-level BPE (tokenizer.ggml.model "gpt2"): "Ġ" is the byte alphabet's space. The merges
# build "hello" and "Ġworld", so TEXT encodes to exactly two ids if the merges are read.
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
TOKENS = (["<|endoftext|>"] + list("abcdefghijklmnopqrstuvwxyz") + ["Ġ", "!", ",", "."]
          + [m.replace(" ", "") for m in MERGES])
VOCAB = len(TOKENS)
EOS_ID = 0
TEXT = "hello world"
CHAT_TEMPLATE = "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}{% endfor %}"


def _hf_weights(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under Hugging Face Llama names and shapes."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)

    weights = {"model.embed_tokens.weight": w(VOCAB, HIDDEN), "model.norm.weight": norm()}
    if not tied:
        weights["lm_head.weight"] = w(VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": w(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": w(HIDDEN, HEADS * HEAD_DIM),
            p + "post_attention_layernorm.weight": norm(),
            p + "mlp.gate_proj.weight": w(FFN, HIDDEN),
            p + "mlp.up_proj.weight": w(FFN, HIDDEN),
            p + "mlp.down_proj.weight": w(HIDDEN, FFN),
        }
    return weights


def _llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permute: q/k rows from HF's rotary half-split order
    into llama.cpp's interleaved one (transformers' GGUF loader reverses it)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _gguf_name(hf_name: str) -> str:
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in names:
        return names[hf_name]
    _, _, layer, *rest = hf_name.split(".")
    short = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}[".".join(rest[:-1])]
    return f"blk.{layer}.{short}.weight"


def write_tiny_llama_gguf(path, weights: dict[str, np.ndarray]) -> None:
    """A llama GGUF holding ``weights`` (HF names; no lm_head = tied embeddings) as F32 tensors."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (VOCAB - 1))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(EOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in weights.items():
        if name.endswith("q_proj.weight"):
            tensor = _llama_cpp_permute(tensor, HEADS)
        elif name.endswith("k_proj.weight"):
            tensor = _llama_cpp_permute(tensor, KV_HEADS)
        writer.add_tensor(_gguf_name(name), tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _reference_logits(weights: dict[str, np.ndarray], ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float32 logits of a Llama built directly from ``weights`` rounded to ``dtype`` (no GGUF on the way)."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                         max_position_embeddings=CONTEXT, rms_norm_eps=RMS_EPS, rope_theta=ROPE_THETA,
                         tie_word_embeddings="lm_head.weight" not in weights)
    model = LlamaForCausalLM(config).float()
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v).to(dtype).float() for k, v in weights.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if config.tie_word_embeddings:
        model.tie_weights()
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("dtype, torch_dtype, tied", [("fp32", torch.float32, True),
                                                      ("bf16", torch.bfloat16, False)],
                         ids=["fp32-tied", "bf16-untied"])
def test_imported_tiny_gguf_is_a_plain_hf_model_with_the_written_weights(tmp_path, dtype, torch_dtype, tied):
    weights = _hf_weights(tied)
    gguf_path = tmp_path / "tiny.F32.gguf"
    write_tiny_llama_gguf(gguf_path, weights)
    out = tmp_path / "model"

    assert import_gguf(str(gguf_path), str(out), dtype=dtype, log=lambda *a: None) == str(out)

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert config["dtype"] == str(torch_dtype).removeprefix("torch.")
    assert config["tie_word_embeddings"] is tied
    assert json.loads((out / MARKER).read_text())["dtype"] == dtype
    assert not (tmp_path / "model.partial").exists()
    # Stored in the requested dtype, not just labelled with it.
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32" if dtype == "fp32" else "BF16"}

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model) is LlamaForCausalLM
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.dtype == torch_dtype and model.dtype == torch_dtype
    # Every written tensor, q/k included (the loader undoes llama.cpp's rotary permutation).
    state = model.state_dict()
    for name, written in weights.items():
        assert torch.equal(state[name], torch.from_numpy(written).to(torch_dtype)), name
    if tied:
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(TEXT)["input_ids"]
    assert ids == [TOKENS.index("hello"), TOKENS.index("Ġworld")]
    assert tokenizer.decode(ids) == TEXT
    assert len(tokenizer) == VOCAB and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.chat_template == CHAT_TEMPLATE

    # Same function as a Llama built from the written weights: the config (heads, kv heads, head_dim,
    # rope theta, norm eps, tying) survived too. Compared in float32, so bf16 arithmetic is no noise.
    batch = torch.tensor([ids + [TOKENS.index("!"), EOS_ID]])
    with torch.no_grad():
        logits = model.float().eval()(batch).logits
    torch.testing.assert_close(logits, _reference_logits(weights, batch, torch_dtype), rtol=1e-5, atol=1e-5)


def test_a_second_import_of_the_same_file_is_reused_and_another_dtype_is_refused(tmp_path):
    gguf_path = tmp_path / "tiny.F32.gguf"
    write_tiny_llama_gguf(gguf_path, _hf_weights(tied=True))
    out = tmp_path / "model"
    import_gguf(str(gguf_path), str(out), log=lambda *a: None)
    lines = []
    assert import_gguf(str(gguf_path), str(out), log=lines.append) == str(out)
    assert len(lines) == 1 and "reusing it" in lines[0]
    with pytest.raises(GGUFImportError, match="exists and is not an import of"):
        import_gguf(str(gguf_path), str(out), dtype="bf16", log=lambda *a: None)
