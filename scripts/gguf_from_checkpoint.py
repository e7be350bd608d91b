"""Write a Phi-3 (Phi3ForCausalLM) checkpoint folder as a GGUF file, for llama.cpp baselines.

Usage: python scripts/gguf_from_checkpoint.py CHECKPOINT OUT.gguf [--quantize q4_0 q4_k_m]

Benchmark-only tool (needs the ``gguf`` package, and ``llama-cpp-python`` for --quantize); not a
phi3edge dependency. It maps tensors the way llama.cpp's own converter does for Phi-3 (fused
qkv_proj -> attn_qkv, fused gate_up_proj -> ffn_up) and writes the vocabulary from
``tokenizer.json`` as an SPM ("llama") vocabulary padded to the model's vocab size. The benchmark
feeds token ids directly, so the tokenizer only has to be well formed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

QUANT_TYPES = {"q4_0": 2, "q4_k_m": 15}  # llama_ftype values


def tensor_name(hf_name: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    parts = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.qkv_proj.weight": "attn_qkv.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    return f"blk.{layer}.{parts[rest]}"


def write_gguf(checkpoint: Path, out: Path) -> None:
    import gguf
    from safetensors import safe_open

    config = json.loads((checkpoint / "config.json").read_text())
    if config.get("rope_scaling"):
        raise SystemExit("LongRoPE members are not handled by this benchmark converter")
    writer = gguf.GGUFWriter(str(out), "phi3")
    heads = config["num_attention_heads"]
    writer.add_name(checkpoint.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_rope_scaling_orig_ctx_len(config["original_max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["id"]: t["content"] for t in tokenizer["added_tokens"]}
    tokens, types = [], []
    for token_id in range(config["vocab_size"]):
        if token_id < len(vocab):
            piece = vocab[token_id][0]
            is_byte = piece.startswith("<0x") and len(piece) == 6
            kind = gguf.TokenType.BYTE if is_byte else gguf.TokenType.NORMAL
            if token_id < 3:
                kind = gguf.TokenType.CONTROL if token_id else gguf.TokenType.UNKNOWN
        elif token_id in added:
            piece, kind = added[token_id], gguf.TokenType.CONTROL
        else:
            piece, kind = f"[PAD{token_id}]", gguf.TokenType.UNUSED
        tokens.append(piece.encode())
        types.append(kind)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(32007)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(32000)

    for shard in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 - safe_open is not a mapping
                value = tensors.get_tensor(name).float().numpy()
                dtype = np.float32 if value.ndim == 1 else np.float16
                writer.add_tensor(tensor_name(name), value.astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()


def quantize(source: Path, out: Path, kind: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[kind]
    params.nthread = 2
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if status != 0:
        raise SystemExit(f"quantizing to {kind} failed ({status})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path, help="the F16 GGUF file to write")
    parser.add_argument("--quantize", nargs="*", choices=sorted(QUANT_TYPES), default=[])
    args = parser.parse_args()
    if not args.out.exists():
        write_gguf(args.checkpoint, args.out)
    for kind in args.quantize:
        target = args.out.with_name(f"{args.out.stem}-{kind}.gguf")
        if not target.exists():
            quantize(args.out, target, kind)
        print(f"{target}: {target.stat().st_size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
