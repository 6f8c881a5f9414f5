"""Regenerate dequant_reference.json: random ggml blocks decoded by the `gguf`
Python package (llama.cpp's own reader), the independent reference that
oqt's dequantizers are tested against.  Run: python3 make_dequant_fixture.py"""
import json
import numpy as np
from gguf import GGMLQuantizationType as T, GGML_QUANT_SIZES, quants

rng = np.random.default_rng(20261121)
out = {"generator": "gguf " + __import__("importlib.metadata").metadata.version("gguf"), "cases": []}
for ty in [T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q6_K]:
    block, nbytes = GGML_QUANT_SIZES[ty]
    n_blocks = 3
    raw = rng.integers(0, 256, size=n_blocks * nbytes, dtype=np.uint8)
    raw = raw.reshape(n_blocks, nbytes)
    # Keep f16 scales finite and moderate: overwrite them with real half floats.
    def put_f16(col, lo, hi):
        vals = rng.uniform(lo, hi, size=n_blocks).astype(np.float16)
        raw[:, col:col + 2] = vals.view(np.uint8).reshape(n_blocks, 2)
    if ty in (T.Q8_0, T.Q4_0):
        put_f16(0, -0.05, 0.05)
    elif ty == T.Q4_1:
        put_f16(0, 0.001, 0.02); put_f16(2, -0.2, 0.0)
    elif ty == T.Q4_K:
        put_f16(0, 0.0001, 0.002); put_f16(2, 0.0001, 0.002)
    elif ty == T.Q6_K:
        put_f16(208, 0.0001, 0.002)
    values = quants.dequantize(raw.reshape(-1), ty).reshape(-1)
    out["cases"].append({"type": ty.name, "bytes_hex": raw.tobytes().hex(), "values": [float(v) for v in values]})
json.dump(out, open(__file__.replace("make_dequant_fixture.py", "dequant_reference.json"), "w"))
