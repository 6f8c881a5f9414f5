#!/usr/bin/env bash
# Side-by-side speed of oqt's runtime and llama.cpp on the same cores, in one run.
#
# Builds llama.cpp from the `vendor/llama.cpp` tree of the PyPI sdist
# llama-cpp-python==0.3.36 (cached under $OQT_BENCH_CACHE), requantizes the
# default model (SmolLM2-135M-Instruct, shipped as Q4_1) to Q4_0 with
# llama-quantize, runs `llama-bench -p 512 -n 128` (and at depth 512), then
# `oqt bench` on w4a8-dyn, w4a8 and lut4-a8-dyn (k-means palettes, the LUT
# kernel) bundles at the same thread count, and prints
# one table with ratios. A benchmark, not a test: .ci/run never runs it.
#
# usage: benches/vs-llama-cpp.sh [--threads N] [--repeats N] [--model GGUF_OR_ALIAS] [--skip-build] [--json-out FILE]
#   --json-out: also write the table's figures as JSON (what notebooks/runtime.ipynb plots).
#   --model: another GGUF (e.g. the 1B-shaped one from benches/make-1b-shaped-gguf.py)
#            instead of the default. Bundles are quantized with RTN: the method does
#            not change what the runtime computes per token, only the values.
set -euo pipefail

THREADS=2
REPEATS=3
MODEL=smollm2-135m
SKIP_BUILD=0
JSON_OUT=
while [[ $# -gt 0 ]]; do
  case "$1" in
    --threads) THREADS=$2; shift 2 ;;
    --repeats) REPEATS=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --skip-build) SKIP_BUILD=1; shift ;;
    --json-out) JSON_OUT=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${OQT_BENCH_CACHE:-$HOME/.cache/oqt/llama.cpp}
WORK=${OQT_BENCH_WORK:-$CACHE/work}
LCP_VERSION=0.3.36
mkdir -p "$CACHE" "$WORK"
export OQT_DATA=${OQT_DATA:-$ROOT/../shared/datasets}

# --- llama.cpp, built once into the cache --------------------------------------
# Every x86 SIMD level this CPU reports except AMX: with GGML_NATIVE the AMX
# matmul is compiled in and segfaults here (the sandbox's kernel does not grant
# AMX tile state), so each level is switched on from /proc/cpuinfo instead (a
# level the CPU lacks, e.g. AVX-VNNI on AMD Zen 4, dies with SIGILL). The build
# is redone when the levels differ from the cached build's.
has() { grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -qx "$1" && echo ON || echo OFF; }
LEVELS="-DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c)
  -DGGML_AVX_VNNI=$(has avx_vnni) -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VBMI=$(has avx512vbmi)
  -DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_BF16=$(has avx512_bf16)"
LEVELS=$(echo $LEVELS)
BIN=$CACHE/build/bin
if [[ ! -x $BIN/llama-bench || ! -x $BIN/llama-quantize || "$(cat "$CACHE/build/.levels" 2>/dev/null)" != "$LEVELS" ]]; then
  command -v cmake >/dev/null || python3 -m pip install -q cmake
  SDIST=$CACHE/src/llama_cpp_python-$LCP_VERSION.tar.gz
  if [[ ! -f $SDIST ]]; then
    # pip prepares an sdist's metadata before saving it, which needs the build backend.
    python3 -m pip install -q scikit-build-core
    python3 -m pip download --no-deps --no-build-isolation "llama-cpp-python==$LCP_VERSION" -d "$CACHE/src"
  fi
  rm -rf "$CACHE/tree" "$CACHE/build" && mkdir -p "$CACHE/tree"
  tar -xzf "$SDIST" -C "$CACHE/tree" --strip-components=1
  # shellcheck disable=SC2086 # LEVELS is a list of flags
  cmake -S "$CACHE/tree/vendor/llama.cpp" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF $LEVELS \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >"$CACHE/cmake.log"
  cmake --build "$CACHE/build" --target llama-bench llama-quantize -j "$(nproc)" >"$CACHE/build.log"
  echo "$LEVELS" >"$CACHE/build/.levels"
fi

# --- oqt, release build ---------------------------------------------------------
if [[ $SKIP_BUILD == 0 ]]; then
  (cd "$ROOT" && cargo build --release -p oqt-cli --quiet)
fi
OQT=$ROOT/target/release/oqt

# --- the models -----------------------------------------------------------------
if [[ -f $MODEL ]]; then
  SRC=$MODEL
else
  SRC=$("$OQT" fetch "$MODEL" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])')
fi
TAG=$(basename "$SRC" .gguf)
Q4_0=$WORK/$TAG.Q4_0.gguf
[[ -f $Q4_0 ]] || "$BIN/llama-quantize" --allow-requantize "$SRC" "$Q4_0" Q4_0 >"$WORK/quantize.log" 2>&1
for r in w4a8-dyn w4a8; do
  [[ -f $WORK/$TAG.$r.oqt ]] || "$OQT" quantize --recipe "$r" "$SRC" --method rtn --no-eval --calib-samples 8 --output "$WORK/$TAG.$r.oqt" >/dev/null 2>&1
done
# Palettized 4-bit (k-means, 16 rows a table, int8 dynamic activations): the LUT kernel.
[[ -f $WORK/$TAG.lut4-a8-dyn.oqt ]] || "$OQT" cluster "$SRC" --method kmeans --bits 4 --group-channels 16 --no-importance \
  --no-eval --output "$WORK/$TAG.lut4-a8-dyn.oqt" >/dev/null 2>&1

# --- the runs (peak RSS from GNU time) ------------------------------------------
rss() { # rss FILE → max resident KiB
  sed -n 's/.*Maximum resident set size (kbytes): //p' "$1"
}
run_timed() { # run_timed NAME CMD... → $WORK/NAME.out, $WORK/NAME.time
  local name=$1; shift
  /usr/bin/time -v -o "$WORK/$name.time" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" || {
    echo "$name failed: see $WORK/$name.err and $WORK/$name.time" >&2; tail -3 "$WORK/$name.time" >&2; exit 1; }
  if grep -q "terminated by signal" "$WORK/$name.time"; then
    echo "$name crashed: $(head -1 "$WORK/$name.time") (see $WORK/$name.err)" >&2; exit 1
  fi
}
rm -f "$WORK"/*.out "$WORK"/*.time "$WORK"/*.err # no stale figures in the table
echo "llama-bench (threads $THREADS)…" >&2
run_timed llama "$BIN/llama-bench" -m "$Q4_0" -t "$THREADS" -p 512 -n 128 -r "$REPEATS" -o json
# (grep reads the whole help: with -q it may exit first, and pipefail would
# then count llama-bench's SIGPIPE as "no depth option".)
if "$BIN/llama-bench" --help 2>&1 | grep -- "-d, --n-depth" >/dev/null; then
  run_timed llama_d512 "$BIN/llama-bench" -m "$Q4_0" -t "$THREADS" -p 0 -n 128 -d 512 -r "$REPEATS" -o json
fi
for r in w4a8-dyn w4a8 lut4-a8-dyn; do
  echo "oqt bench $r…" >&2
  RAYON_NUM_THREADS=$THREADS run_timed "oqt_${r}_empty" "$OQT" bench --bundle "$WORK/$TAG.$r.oqt" \
    --threads "$THREADS" --prompt-tokens 1 --decode-tokens 128 --repeats "$REPEATS" --json
  RAYON_NUM_THREADS=$THREADS run_timed "oqt_${r}_p512" "$OQT" bench --bundle "$WORK/$TAG.$r.oqt" \
    --threads "$THREADS" --prompt-tokens 512 --decode-tokens 128 --repeats "$REPEATS" --json
done

# --- one table ------------------------------------------------------------------
WORK=$WORK THREADS=$THREADS JSON_OUT=$JSON_OUT MODEL_TAG=$TAG python3 - <<'PY'
import json, os, re
w = os.environ["WORK"]
rows = []
def rss(name):
    t = open(f"{w}/{name}.time").read()
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 1024
def llama(name):
    p = f"{w}/{name}.out"
    if not os.path.exists(p):
        return {}
    out = {}
    for r in json.load(open(p)):
        key = "pp" if r["n_prompt"] > 0 and r["n_gen"] == 0 else "tg"
        out[key] = r["avg_ts"]
    return out
base, deep = llama("llama"), llama("llama_d512")
# Peak memory at the same context (512 prompt + 128 generated tokens): llama.cpp's
# depth-512 run against oqt's 512-token-prompt run (llama-bench sizes its KV cache
# to the test's context; its pp512/tg128 run holds at most 512 positions).
ctx_rss = "llama_d512" if os.path.exists(f"{w}/llama_d512.time") else "llama"
base_rss = rss(ctx_rss)
print(f"threads {os.environ['THREADS']}; llama.cpp Q4_0 vs oqt runtime (ratios: oqt / llama.cpp)\n")
print("| engine | prefill 512 tok/s | decode tg128 tok/s | decode @512 tok/s | peak RSS MiB, context 640 |")
print("|---|---|---|---|---|")
d = deep.get("tg", float("nan"))
print(f"| llama.cpp Q4_0 | {base['pp']:.1f} | {base['tg']:.1f} | {d:.1f} | {base_rss:.0f}"
      f"{'' if ctx_rss == 'llama_d512' else ' (context 512)'} |")
rows.append({"engine": "llama.cpp Q4_0", "prefill_tok_s": base["pp"], "decode_tok_s": base["tg"],
             "decode_at_512_tok_s": d, "peak_rss_mib": base_rss})
for r in ["w4a8-dyn", "w4a8", "lut4-a8-dyn"]:
    e = json.load(open(f"{w}/oqt_{r}_empty.out"))
    p = json.load(open(f"{w}/oqt_{r}_p512.out"))
    peak = rss(f"oqt_{r}_p512")
    print(f"| oqt `{r}` | {p['prefill_tok_s']:.1f} ({p['prefill_tok_s']/base['pp']:.2f}×) "
          f"| {e['decode_tok_s']:.1f} ({e['decode_tok_s']/base['tg']:.2f}×) "
          f"| {p['decode_tok_s']:.1f} ({p['decode_tok_s']/d:.2f}×) | {peak:.0f} ({peak/base_rss:.2f}×) |")
    rows.append({"engine": f"oqt {r}", "prefill_tok_s": p["prefill_tok_s"], "decode_tok_s": e["decode_tok_s"],
                 "decode_at_512_tok_s": p["decode_tok_s"], "peak_rss_mib": peak})
if os.environ["JSON_OUT"]:
    with open(os.environ["JSON_OUT"], "w") as f:
        json.dump({"model": os.environ["MODEL_TAG"], "threads": int(os.environ["THREADS"]),
                   "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), None),
                   "rows": rows}, f, indent=1)
PY
