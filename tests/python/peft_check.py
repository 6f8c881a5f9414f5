"""What the `safetensors` Python package (Hugging Face's reader, which PEFT
uses) sees in an oqt LoRA adapter directory, checked against PEFT's layout.

    peft_check.py ADAPTER_DIR OUT.json

Exits non-zero naming the first thing PEFT would not accept; otherwise
writes the config and every tensor's name, dtype, shape and value sum.
"""

import json
import re
import sys

try:
    from safetensors.numpy import load_file
except ImportError:  # the test names the fix
    sys.exit("the `safetensors` Python package is missing: python3 -m pip install safetensors numpy")

NAME = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_(A|B)\.weight$"
)


def main(adapter_dir, out_path):
    with open(f"{adapter_dir}/adapter_config.json") as f:
        config = json.load(f)
    for field, want in [("peft_type", "LORA"), ("task_type", "CAUSAL_LM"), ("bias", "none")]:
        if config.get(field) != want:
            sys.exit(f"adapter_config.json: {field} is {config.get(field)!r}, PEFT expects {want!r}")
    for field in ["r", "lora_alpha", "target_modules", "base_model_name_or_path"]:
        if field not in config:
            sys.exit(f"adapter_config.json: {field} missing")
    r = config["r"]
    tensors = load_file(f"{adapter_dir}/adapter_model.safetensors")
    out = []
    for name, t in sorted(tensors.items()):
        m = NAME.match(name)
        if not m:
            sys.exit(f"adapter_model.safetensors: {name} is not a PEFT LoRA tensor name")
        if m.group(3) not in config["target_modules"]:
            sys.exit(f"{name}: module {m.group(3)} is not in target_modules")
        if t.ndim != 2 or (m.group(4) == "A" and t.shape[0] != r) or (m.group(4) == "B" and t.shape[1] != r):
            sys.exit(f"{name}: shape {t.shape} does not have rank {r} where PEFT puts it")
        out.append({"name": name, "dtype": str(t.dtype), "shape": list(t.shape), "sum": float(t.astype("float64").sum())})
    with open(out_path, "w") as f:
        json.dump({"config": config, "tensors": out}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
