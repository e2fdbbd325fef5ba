# Sourced by the SmolLM2 benchmark scripts, from the repository root: the converted checkpoint
# ($ckpt, fetched once by scripts/fetch-smollm2.sh), a release build of famc ($famc), the ONNX
# Runtime library of .venv (ORT_DYLIB_PATH, unless set), and a scratch folder ($work) removed on exit.
ckpt="$(bash scripts/fetch-smollm2.sh | tail -n 1)"
cargo build -q --release --bin famc
famc=target/release/famc
if [ -z "${ORT_DYLIB_PATH:-}" ] && [ -x .venv/bin/python ]; then
  ORT_DYLIB_PATH="$(.venv/bin/python -c 'import onnxruntime, os, glob; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))[-1])')"
  export ORT_DYLIB_PATH
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
