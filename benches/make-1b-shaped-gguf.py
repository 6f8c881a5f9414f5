#!/usr/bin/env python3
"""Write a random-weight GGUF with Llama-3.2-1B's shapes, for speed benchmarks.

The weights are noise (no quality to measure), the shapes are Llama-3.2-1B's:
16 layers, hidden 2048, FFN 8192, 32 query / 8 KV heads of 64, vocabulary
128256, tied embeddings, RoPE base 500000. The tokenizer is the default
model's (SmolLM2, byte-level BPE), its token list padded with unused tokens to
the 1B vocabulary, so both oqt and llama.cpp tokenize the bench prompt.

usage: benches/make-1b-shaped-gguf.py TOKENIZER_GGUF OUTPUT_GGUF [--type f16|q8_0]

`benches/vs-llama-cpp.sh --model OUTPUT_GGUF` then benchmarks it; oqt's own
GGUF of the same weights comes from `oqt export --format gguf` of its bundle.
"""

import argparse
import os
import sys

import numpy as np

try:
    import gguf
except ImportError:  # the bench's only Python dependency
    sys.exit("needs the gguf package: python3 -m pip install gguf==0.19.0")

SHAPES = dict(layers=16, hidden=2048, ffn=8192, heads=32, kv_heads=8, head_dim=64, vocab=128256)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tokenizer_gguf", help="a GGUF whose tokenizer to reuse (the default model)")
    ap.add_argument("output", help="where to write the 1B-shaped GGUF")
    ap.add_argument("--type", choices=["f16", "q8_0"], default="f16", help="type of the 2-D weights")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    src = gguf.GGUFReader(args.tokenizer_gguf)

    def field(name):
        f = src.fields.get(name)
        if f is None:
            sys.exit(f"{args.tokenizer_gguf}: no metadata field {name!r} (expected a GGUF with a tokenizer)")
        return f

    def strings(name):
        f = field(name)
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def scalar(name):
        f = field(name)
        return f.parts[f.data[0]][0]

    tokens = strings("tokenizer.ggml.tokens")
    merges = strings("tokenizer.ggml.merges")
    types = [int(field("tokenizer.ggml.token_type").parts[i][0]) for i in field("tokenizer.ggml.token_type").data]
    s = SHAPES
    if len(tokens) > s["vocab"]:
        sys.exit(f"{args.tokenizer_gguf}: {len(tokens)} tokens, more than the 1B vocabulary {s['vocab']}")
    while len(tokens) < s["vocab"]:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(int(gguf.TokenType.UNUSED))

    tmp = args.output + ".partial"
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name("llama-3.2-1b-shaped-random")
    w.add_block_count(s["layers"])
    w.add_context_length(4096)
    w.add_embedding_length(s["hidden"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_dimension_count(s["head_dim"])
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(s["vocab"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(int(scalar("tokenizer.ggml.bos_token_id")))
    w.add_eos_token_id(int(scalar("tokenizer.ggml.eos_token_id")))
    w.add_add_bos_token(False)

    rng = np.random.default_rng(args.seed)
    qtype = gguf.GGMLQuantizationType.F16 if args.type == "f16" else gguf.GGMLQuantizationType.Q8_0

    def matrix(name, rows, cols):
        x = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    def norm(name, n):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32))

    h, kv = s["hidden"], s["kv_heads"] * s["head_dim"]
    matrix("token_embd.weight", s["vocab"], h)
    for i in range(s["layers"]):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight", h)
        matrix(p + "attn_q.weight", s["heads"] * s["head_dim"], h)
        matrix(p + "attn_k.weight", kv, h)
        matrix(p + "attn_v.weight", kv, h)
        matrix(p + "attn_output.weight", h, s["heads"] * s["head_dim"])
        norm(p + "ffn_norm.weight", h)
        matrix(p + "ffn_gate.weight", s["ffn"], h)
        matrix(p + "ffn_up.weight", s["ffn"], h)
        matrix(p + "ffn_down.weight", h, s["ffn"])
    norm("output_norm.weight", h)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, args.output)  # never a half-written model under the final name
    print(args.output)


if __name__ == "__main__":
    main()
