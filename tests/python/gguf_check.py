"""What the `gguf` Python package (llama.cpp's own reader and reference
quantizers) sees, for oqt's tests to compare against.

    gguf_check.py quantize VALUES.f32 TYPE OUT.bin   # gguf.quants.quantize of [rows, cols] f32
    gguf_check.py dump FILE.gguf OUT.json            # metadata and tensors as GGUFReader reads them
"""

import hashlib
import json
import sys

import numpy as np

try:
    import gguf
    from gguf.quants import quantize, dequantize
except ImportError:  # the test names the fix
    sys.exit("the `gguf` Python package is missing: python3 -m pip install gguf==0.19.0")


def cmd_quantize(values_path, type_name, out_path, cols):
    qtype = gguf.GGMLQuantizationType[type_name]
    x = np.fromfile(values_path, dtype="<f4").reshape(-1, int(cols))
    np.asarray(quantize(x, qtype)).tofile(out_path)


def field_value(field):
    """A metadata field as plain JSON: scalars, strings, arrays of either."""
    types = field.types
    if types[0] == gguf.GGUFValueType.ARRAY:
        items = [field.parts[i] for i in field.data]
        if types[1] == gguf.GGUFValueType.STRING:
            return {"type": "array[string]", "value": [bytes(p).decode("utf-8") for p in items]}
        return {"type": f"array[{types[1].name.lower()}]", "value": [p.tolist()[0] for p in items]}
    part = field.parts[field.data[0]]
    if types[0] == gguf.GGUFValueType.STRING:
        return {"type": "string", "value": bytes(part).decode("utf-8")}
    return {"type": types[0].name.lower(), "value": part.tolist()[0]}


def cmd_dump(path, out_path):
    reader = gguf.GGUFReader(path)
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        meta[name] = field_value(field)
    tensors = []
    for t in reader.tensors:
        raw = np.asarray(t.data).tobytes()
        values = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        tensors.append(
            {
                "name": t.name,
                "type": t.tensor_type.name,
                # ggml order: dims[0] is the row length.
                "dims": [int(d) for d in t.shape],
                "offset": int(t.data_offset),
                "sha256": hashlib.sha256(raw).hexdigest(),
                "values_sha256": hashlib.sha256(values.tobytes()).hexdigest(),
            }
        )
    with open(out_path, "w") as f:
        json.dump({"metadata": meta, "tensors": tensors, "alignment": reader.alignment}, f)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"quantize": cmd_quantize, "dump": cmd_dump}[cmd](*args)
