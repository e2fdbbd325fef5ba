#!/usr/bin/env bash
# famc on an NVIDIA GPU, in one command: ONNX Runtime's CUDA and TensorRT execution providers
# checked against its CPU provider (logits of the same tokens), then their prefill and decode
# throughput. Needs an NVIDIA GPU and driver for CUDA 13 (r580 or newer), Python 3.11+ and a Rust
# toolchain; the first run downloads about 4 GB of wheels and builds famc (several minutes).
#
#   bash scripts/gpu-check.sh
#
# What it does, under $GPU_CHECK_OUT (default target/gpu-check):
#   1. a virtualenv ($GPU_VENV, default .venv-gpu) with onnxruntime-gpu 1.31.1 and the NVIDIA
#      wheels it loads: onnxruntime-gpu[cuda,cudnn] (CUDA 13 runtime, cuBLAS, cuRAND, cuFFT, NVRTC,
#      cuDNN 9) and tensorrt-cu13-libs 10.x (from pypi.nvidia.com; ONNX Runtime 1.31's TensorRT
#      provider loads libnvinfer.so.10);
#   2. famc built with `--features cuda,tensorrt --release` (or $FAMC_BIN);
#   3. `famc doctor`: the providers the library offers and whether they register;
#   4. the tiny golden exports (graphs/tiny-fam*, 100 tokens over 7 blocks; one per target) on
#      --ep cpu, cuda, tensorrt, tensorrt --trt-fp16, and tensorrt again from its engine cache,
#      against each other and against the f64 reference's logits stored with them;
#   5. a random model of 1B-parameter Llama shape (the `1b` bench preset: d 2048, 16 layers, 32
#      heads, 8 KV heads, MLP 5632, vocab 32000, tied embeddings, about 0.8B parameters;
#      L = 1024, F = 64, M = 1), exported once (the first target), run over 1124 tokens (one full block, which advances
#      the state, and a 100-token tail) on cpu, cuda and tensorrt;
#   6. `famc bench` of that model (else the tiny one) on cuda and tensorrt: prefill and decode
#      tokens/s; on cuda also with the state copied through the host per block (--compare-state).
# Step 4 also checks, with `famc score --json`, that the stream state stays in GPU memory between
# blocks on cuda and tensorrt.
#
# Tolerance (the logits of a GPU provider against the CPU provider's, same graphs and tokens):
# max |logit - cpu logit| <= 2e-2 x (cpu logits' max - min) for cuda and tensorrt in float32 (both
# use TF32 matrix products by default, about 1e-3 relative per product), <= 5e-2 for tensorrt with
# --trt-fp16. The share of rows whose argmax agrees is printed too (random weights give close
# calls, so it is not checked).
#
# Environment:
#   GPU_CHECK_OUT       results and scratch (default target/gpu-check); logs in $GPU_CHECK_OUT/logs
#   GPU_CHECK_BUDGET_S  time budget in seconds for the whole script (default 480): a step that
#                       would start after it is skipped, a running one is cut off at it
#   GPU_VENV            the virtualenv (created when it has no python); PIP_ONLINE=0 never installs
#   ORT_GPU_SPEC        default "onnxruntime-gpu[cuda,cudnn]==1.31.1"
#   TRT_SPEC            default "tensorrt-cu13-libs==10.16.1.11"; empty skips TensorRT's wheels
#   FAMC_BIN            a famc built with --features cuda,tensorrt (skips the build)
#   GPU_CHECK_1B=0      skip the 1B model;  GPU_CHECK_TRT=0  skip TensorRT
#   DEVICE_ID           the GPU (default 0)
#   GPU_CHECK_TARGETS   the export targets the tiny model runs in (default "opset23 opset17 ort";
#                       graphs/tiny-fam-TARGET); the 1B model and the bench use the first
#   GPU_PYTHON          a Python with numpy (and the NVIDIA wheels) to use instead of the venv
#   ORT_DYLIB_PATH      ONNX Runtime's library, if not the venv's onnxruntime-gpu; its providers
#                       (libonnxruntime_providers_*.so) must lie beside it
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$SECONDS
OUT=${GPU_CHECK_OUT:-$ROOT/target/gpu-check}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
VENV=${GPU_VENV:-$ROOT/.venv-gpu}
ORT_GPU_SPEC=${ORT_GPU_SPEC:-onnxruntime-gpu[cuda,cudnn]==1.31.1}
TRT_SPEC=${TRT_SPEC-tensorrt-cu13-libs==10.16.1.11}
DO_1B=${GPU_CHECK_1B:-1}
DO_TRT=${GPU_CHECK_TRT:-1}
DEV=${DEVICE_ID:-0}
TARGETS=${GPU_CHECK_TARGETS:-opset23 opset17 ort}
BIG_TARGET=${TARGETS%% *}
TOL_FP32=2e-2
TOL_FP16=5e-2
mkdir -p "$OUT/logs"
export OUT
CACHE=$OUT/trt-cache
SUMMARY=()
FAILED=0

elapsed() { echo $((SECONDS - START)); }
left() { echo $((BUDGET - (SECONDS - START))); }
note() { printf '[%s] %s\n' "$(date +%T)" "$*"; }
record() { SUMMARY+=("$(printf '%-34s %-8s %s' "$1" "$2" "${3:-}")"); }

# step NAME MIN_SECONDS CMD...: runs CMD, a program or a function of this script (output to
# logs/NAME.log and the terminal) when at least MIN_SECONDS of the budget are left, cut off when
# the budget runs out.
step() {
    local name=$1 need=$2
    shift 2
    local rest
    rest=$(left)
    if ((rest < need)); then
        note "SKIP $name: ${rest}s of the budget left, it needs about ${need}s"
        record "$name" SKIP "budget"
        return 2
    fi
    note "$name"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$rest" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$OUT/logs/$name.log"
    rc=${PIPESTATUS[0]}
    if ((rc == 0)); then
        record "$name" ok "$((SECONDS - t0))s"
    elif ((rc == 124 || rc == 137)); then
        record "$name" TIMEOUT "$((SECONDS - t0))s"
        FAILED=1
    else
        record "$name" FAIL "rc $rc, $((SECONDS - t0))s, see logs/$name.log"
        FAILED=1
    fi
    return "$rc"
}

finish() {
    echo
    echo "== gpu-check summary ($(elapsed)s of ${BUDGET}s; logs in $OUT/logs)"
    printf '%s\n' "${SUMMARY[@]}"
    if [[ -s $OUT/results.txt ]]; then
        echo
        cat "$OUT/results.txt"
    fi
}
trap finish EXIT
: >"$OUT/results.txt"

# ---------------------------------------------------------------------------------------------
# 0. the machine
# ---------------------------------------------------------------------------------------------
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/logs/gpu.txt"
else
    note "nvidia-smi not found: no NVIDIA driver here; the GPU runs will fail"
fi

# ---------------------------------------------------------------------------------------------
# 1. ONNX Runtime with CUDA and TensorRT, and the NVIDIA libraries it loads
# ---------------------------------------------------------------------------------------------
setup_venv() {
    if [[ ! -x $VENV/bin/python ]]; then
        python3 -m venv "$VENV" || return 1
    fi
    if [[ ${PIP_ONLINE:-1} == 0 ]]; then
        return 0
    fi
    if ! "$VENV/bin/python" -c 'import onnxruntime, numpy' 2>/dev/null; then
        "$VENV/bin/pip" install -q "$ORT_GPU_SPEC" numpy || return 1
    fi
    if [[ $DO_TRT == 1 && -n $TRT_SPEC ]] &&
        ! compgen -G "$VENV/lib/python3*/site-packages/tensorrt_libs/libnvinfer.so.*" >/dev/null; then
        # the PyPI package is a stub that fetches the wheel from NVIDIA's index
        "$VENV/bin/pip" install -q --extra-index-url https://pypi.nvidia.com "$TRT_SPEC" ||
            note "TensorRT wheels not installed: --ep tensorrt will fail to register"
    fi
}
export -f note setup_venv
export VENV ORT_GPU_SPEC TRT_SPEC DO_TRT PIP_ONLINE=${PIP_ONLINE:-1}
if [[ -n ${GPU_PYTHON:-} ]]; then
    # a Python that already has numpy and the NVIDIA wheels (a machine without network)
    PY=$(command -v "$GPU_PYTHON") || { note "GPU_PYTHON=$GPU_PYTHON is not a program"; exit 1; }
else
    step setup-venv 60 setup_venv || { note "no usable virtualenv at $VENV"; exit 1; }
    PY=$VENV/bin/python
fi
export PY
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [[ -z ${ORT_DYLIB_PATH:-} ]]; then
    ORT_DYLIB_PATH=$(ls "$SITE"/onnxruntime/capi/libonnxruntime.so.1.* 2>/dev/null | sort -V | tail -1)
fi
if [[ ! -f $ORT_DYLIB_PATH ]]; then
    note "no onnxruntime library: set ORT_DYLIB_PATH or install onnxruntime-gpu in $SITE"
    exit 1
fi
export ORT_DYLIB_PATH
# famc loads ONNX Runtime itself (no Python): the providers (beside the library) find the NVIDIA
# wheels' libraries through LD_LIBRARY_PATH (nvidia/cu13/lib, nvidia/cudnn/lib, tensorrt_libs, ...)
LIBDIRS=$(find "$SITE/nvidia" "$SITE/tensorrt_libs" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
export LD_LIBRARY_PATH=$(dirname "$ORT_DYLIB_PATH")${LIBDIRS:+:$LIBDIRS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
note "ORT_DYLIB_PATH=$ORT_DYLIB_PATH"
note "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

# ---------------------------------------------------------------------------------------------
# 2. famc with the cuda and tensorrt features
# ---------------------------------------------------------------------------------------------
if [[ -n ${FAMC_BIN:-} ]]; then
    export FAMC=$FAMC_BIN
else
    step build 30 cargo build --release --features cuda,tensorrt || exit 1
    export FAMC=$ROOT/target/release/famc
fi

# ---------------------------------------------------------------------------------------------
# 3. what the library offers
# ---------------------------------------------------------------------------------------------
step doctor 5 "$FAMC" doctor

# compare NAME CPU.npy OTHER.npy TOLERANCE: max |Δ| relative to the CPU logits' range, argmax
# agreement; a line in results.txt; non-zero when over the tolerance
compare() {
    "$PY" - "$@" <<'EOF'
import sys
import numpy as np
name, ref, got, tol = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
a, b = np.load(ref).astype(np.float64), np.load(got).astype(np.float64)
assert a.shape == b.shape, f"{name}: shapes {a.shape} and {b.shape} differ"
assert np.isfinite(b).all(), f"{name}: non-finite logits"
rel = np.abs(a - b).max() / max(a.max() - a.min(), 1e-30)
agree = (a.argmax(-1) == b.argmax(-1)).mean()
ok = rel <= tol
line = f"{name:<28} max|d|/range {rel:.2e} (tolerance {tol:.0e}) argmax agreement {agree:.3f} over {a.shape[0]} rows: {'ok' if ok else 'FAIL'}"
print(line)
open(sys.argv[5], "a").write(line + "\n")
sys.exit(0 if ok else 1)
EOF
}

run_ep() { # run_ep MODEL TOKENS OUT.npy EP-ARGS...
    local model=$1 tokens=$2 out=$3
    shift 3
    "$FAMC" run "$model" --tokens "$tokens" --logits-out "$out" --backend ort "$@"
}
# state_on_device NAME MODEL TOKENS EP-ARGS...: `famc score --json` reports where the stream's
# state was kept between blocks; on a GPU provider it must be the GPU's memory (ort cuda:N)
state_on_device() {
    local name=$1 model=$2 tokens=$3
    shift 3
    local j
    j=$("$FAMC" score "$model" --tokens "$tokens" --backend ort --json --quiet "$@") || return 1
    echo "$j"
    "$PY" - "$name" "$j" "$OUT/results.txt" <<'EOF'
import json, sys
name, j = sys.argv[1], json.loads(sys.argv[2])
ok = j.get("state_location", "").startswith("ort cuda:")
line = f"{name + ' state':<28} kept in {j.get('state_location')!r} between blocks, mean NLL {j['mean_nll']:.6f}: {'ok' if ok else 'FAIL'}"
print(line)
open(sys.argv[3], "a").write(line + "\n")
sys.exit(0 if ok else 1)
EOF
}
export -f compare run_ep state_on_device

# ---------------------------------------------------------------------------------------------
# 4. the tiny golden exports, one per target
# ---------------------------------------------------------------------------------------------
for target in $TARGETS; do
    T=tiny-$target
    TINY=$ROOT/graphs/tiny-fam
    [[ $target == opset17 ]] || TINY=$ROOT/graphs/tiny-fam-$target
    TIDS=$TINY/ids.txt
    if step $T-cpu 10 run_ep "$TINY" "$TIDS" "$OUT/$T-cpu.npy" --ep cpu; then
        step $T-cpu-vs-reference 5 compare $T-cpu-vs-reference "$TINY/logits.npy" "$OUT/$T-cpu.npy" $TOL_FP32 "$OUT/results.txt"
        step $T-cuda 20 run_ep "$TINY" "$TIDS" "$OUT/$T-cuda.npy" --ep cuda --device-id "$DEV" &&
            step $T-cuda-vs-cpu 5 compare $T-cuda "$OUT/$T-cpu.npy" "$OUT/$T-cuda.npy" $TOL_FP32 "$OUT/results.txt" &&
            step $T-cuda-vs-reference 5 compare $T-cuda-vs-reference "$TINY/logits.npy" "$OUT/$T-cuda.npy" $TOL_FP32 "$OUT/results.txt"
        step $T-cuda-state 20 state_on_device $T-cuda "$TINY" "$TIDS" --ep cuda --device-id "$DEV"
        if [[ $DO_TRT == 1 ]]; then
            step $T-trt 60 run_ep "$TINY" "$TIDS" "$OUT/$T-trt.npy" --ep tensorrt --device-id "$DEV" --trt-cache-dir "$CACHE" &&
                step $T-trt-vs-cpu 5 compare $T-tensorrt "$OUT/$T-cpu.npy" "$OUT/$T-trt.npy" $TOL_FP32 "$OUT/results.txt"
            step $T-trt-fp16 60 run_ep "$TINY" "$TIDS" "$OUT/$T-trt16.npy" --ep tensorrt --device-id "$DEV" --trt-cache-dir "$CACHE" --trt-fp16 &&
                step $T-trt-fp16-vs-cpu 5 compare $T-tensorrt-fp16 "$OUT/$T-cpu.npy" "$OUT/$T-trt16.npy" $TOL_FP16 "$OUT/results.txt"
            step $T-trt-state 30 state_on_device $T-tensorrt "$TINY" "$TIDS" --ep tensorrt --device-id "$DEV" --trt-cache-dir "$CACHE"
            # again: the engines now come from the cache
            t0=$SECONDS
            if step $T-trt-cached 30 run_ep "$TINY" "$TIDS" "$OUT/$T-trt-again.npy" --ep tensorrt --device-id "$DEV" --trt-cache-dir "$CACHE"; then
                engines=$(find "$CACHE" -name '*.engine' | wc -l)
                echo "$T tensorrt from its cache: $((SECONDS - t0))s, $engines engine file(s) under $CACHE" | tee -a "$OUT/results.txt"
                step $T-trt-cached-vs-cpu 5 compare $T-tensorrt-cached "$OUT/$T-cpu.npy" "$OUT/$T-trt-again.npy" $TOL_FP32 "$OUT/results.txt"
            fi
        fi
    fi
done

# ---------------------------------------------------------------------------------------------
# 5. a random model of 1B-parameter shape
# ---------------------------------------------------------------------------------------------
export BIG=$OUT/model-1b
BENCH_MODEL=$ROOT/graphs/tiny-fam
[[ $BIG_TARGET == opset17 ]] || BENCH_MODEL+=-$BIG_TARGET
BENCH_NAME=tiny
BENCH_TOKENS=64
write_1b() {
    # the `1b` preset's shape, uniform random weights scaled like an initialised model
    # (famc::model::synthetic::write_checkpoint's scheme, numpy's generator)
    "$PY" - "$BIG/ckpt" <<'EOF'
import json, os, struct, sys
import numpy as np
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
d, n_layers, heads, kv_heads, inter, vocab = 2048, 16, 32, 8, 5632, 32000
dh = d // heads
kv = kv_heads * dh
json.dump({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d,
    "num_hidden_layers": n_layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
    "head_dim": dh, "intermediate_size": inter, "rms_norm_eps": 1e-5, "vocab_size": vocab,
    "tie_word_embeddings": True, "hidden_act": "silu", "rope_theta": 10000.0,
}, open(os.path.join(out, "config.json"), "w"), indent=2)
s = lambda fan_in: (3.0 / fan_in) ** 0.5
tensors = [("model.embed_tokens.weight", [vocab, d], 1.0, 0.0)]
for l in range(n_layers):
    p = f"model.layers.{l}."
    tensors += [
        (p + "input_layernorm.weight", [d], 0.0, 1.0),
        (p + "post_attention_layernorm.weight", [d], 0.0, 1.0),
        (p + "self_attn.q_proj.weight", [d, d], s(d), 0.0),
        (p + "self_attn.k_proj.weight", [kv, d], s(d), 0.0),
        (p + "self_attn.v_proj.weight", [kv, d], s(d), 0.0),
        (p + "self_attn.o_proj.weight", [d, d], s(d), 0.0),
        (p + "mlp.gate_proj.weight", [inter, d], s(d), 0.0),
        (p + "mlp.up_proj.weight", [inter, d], s(d), 0.0),
        (p + "mlp.down_proj.weight", [d, inter], s(inter), 0.0),
    ]
tensors.append(("model.norm.weight", [d], 0.0, 1.0))
header, off = {}, 0
for name, shape, _, _ in tensors:
    n = int(np.prod(shape)) * 4
    header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + n]}
    off += n
h = json.dumps(header).encode()
h += b" " * (-len(h) % 8)
rng = np.random.default_rng(1)
with open(os.path.join(out, "model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h)
    for name, shape, scale, offset in tensors:
        w = rng.random(int(np.prod(shape)), dtype=np.float32) * (2 * scale) + (offset - scale)
        f.write(w.astype("<f4").tobytes())
params = sum(int(np.prod(t[1])) for t in tensors)
print(f"wrote {params / 1e9:.2f}B parameters to {out}")
# 1124 token ids: one full block of 1024 and a 100-token tail
ids = np.random.default_rng(2).integers(0, vocab, 1124)
open(os.path.join(os.path.dirname(out), "ids.txt"), "w").write(" ".join(map(str, ids)) + "\n")
EOF
}
export -f write_1b
if [[ $DO_1B == 1 ]]; then
    if [[ -f $BIG/export/famc.json ]]; then
        note "reusing the 1B export in $BIG/export"
        have_big=1
    else
        have_big=0
        rm -rf "$BIG"
        step 1b-write-checkpoint 90 write_1b &&
            step 1b-export 150 "$FAMC" export "$BIG/ckpt" --block-len 1024 --fam-len 64 --mem-blocks 1 --target "$BIG_TARGET" --out "$BIG/export" &&
            have_big=1
        rm -rf "$BIG/ckpt"
    fi
    if ((have_big)); then
        BENCH_MODEL=$BIG/export
        BENCH_NAME=1b
        BENCH_TOKENS=4096
        B=$BIG/export
        BIDS=$BIG/ids.txt
        if step 1b-cpu 90 run_ep "$B" "$BIDS" "$OUT/1b-cpu.npy" --ep cpu; then
            step 1b-cuda 40 run_ep "$B" "$BIDS" "$OUT/1b-cuda.npy" --ep cuda --device-id "$DEV" &&
                step 1b-cuda-vs-cpu 10 compare 1b-cuda "$OUT/1b-cpu.npy" "$OUT/1b-cuda.npy" $TOL_FP32 "$OUT/results.txt"
            if [[ $DO_TRT == 1 ]]; then
                # the first TensorRT run builds the engines (minutes); the bench below reuses them
                step 1b-trt 150 run_ep "$B" "$BIDS" "$OUT/1b-trt.npy" --ep tensorrt --device-id "$DEV" --trt-cache-dir "$CACHE" &&
                    step 1b-trt-vs-cpu 10 compare 1b-tensorrt "$OUT/1b-cpu.npy" "$OUT/1b-trt.npy" $TOL_FP32 "$OUT/results.txt"
            fi
        fi
    fi
fi

# ---------------------------------------------------------------------------------------------
# 6. throughput: prefill and decode tokens/s
# ---------------------------------------------------------------------------------------------
bench() { # bench NAME EP-ARGS...
    local name=$1
    shift
    "$FAMC" bench "$BENCH_MODEL" --backend ort --tokens "$BENCH_TOKENS" --decode-tokens 64 --runs 3 \
        --json "$OUT/bench-$name.json" "$@" | tee "$OUT/bench-$name.txt"
    return "${PIPESTATUS[0]}"
}
export -f bench
export BENCH_MODEL BENCH_TOKENS
# --compare-state: the same runs with the state copied to the host after every block and token
step bench-cuda 30 bench cuda --ep cuda --device-id "$DEV" --compare-state &&
    sed "s/^/bench cuda     $BENCH_NAME: /" "$OUT/bench-cuda.txt" >>"$OUT/results.txt"
if [[ $DO_TRT == 1 ]]; then
    step bench-tensorrt 90 bench tensorrt --ep tensorrt --device-id "$DEV" --trt-cache-dir "$CACHE" &&
        sed "s/^/bench tensorrt $BENCH_NAME: /" "$OUT/bench-tensorrt.txt" >>"$OUT/results.txt"
fi

exit $FAILED
