#!/usr/bin/env bash
# Regenerates the golden exports in graphs/: for each case, the graphs and famc.json that
# `famc export` writes, a text dump of each graph, and an io fixture (ids and the logits of the
# pure-Rust reference, which shares no code with graph emission).
# Run after an intended change to emission; tests/golden.rs fails on any unintended one.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q
famc=target/debug/famc
ckpt=tests/data/hf-llama-tiny
# name L F M target
cases=("tiny-fam 16 4 2 opset17" "tiny-bswa 16 0 1 opset17" "tiny-fam-opset23 16 4 2 opset23" "tiny-fam-ort 16 4 2 ort")
for c in "${cases[@]}"; do
  read -r name l f m target <<<"$c"
  out=graphs/$name
  rm -rf "$out"
  $famc export "$ckpt" --block-len "$l" --fam-len "$f" --mem-blocks "$m" --target "$target" --out "$out"
  for g in "$out"/*.onnx; do
    $famc inspect "$g" --nodes >"${g%.onnx}.txt"
  done
  cp "$ckpt/ids.txt" "$out/ids.txt"
  $famc run "$ckpt" --backend reference --block-len "$l" --fam-len "$f" --mem-blocks "$m" \
    --tokens "$out/ids.txt" --logits-out "$out/logits.npy"
done
