#!/usr/bin/env python3
"""Validates famc graphs: onnx.checker (full_check) and strict shape inference, plus famc's rules
and, for an export directory, that every graph declares exactly famc.json's contract for it.

Usage: check_graphs.py FILE.onnx|EXPORT_DIR ...   Exit status 1 on the first failure.
"""
import json
import os
import sys

import onnx
from onnx import shape_inference

FORBIDDEN_OPS = {"If", "Loop", "Scan"}
# famc's targets: the default domain's opset and the IR version each declares (ONNX Runtime 1.31
# loads IR 10 to 12).
TARGETS = {17: 10, 23: 11}


ELEM = {"float32": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64}


def graphs_of(path):
    """(graph path, its contract from famc.json or None) for a graph file or an export directory."""
    if os.path.isdir(path):
        with open(os.path.join(path, "famc.json")) as f:
            manifest = json.load(f)
        keys = [k for k in ("block", "init", "decode", "fam_kv", "score") if manifest["graphs"].get(k)]
        missing = [k for k in keys if k not in manifest["contract"]]
        assert not missing, f"famc.json has no contract for {missing}"
        return [(os.path.join(path, manifest["graphs"][k]), manifest["contract"][k]) for k in keys]
    return [(path, None)]


def check_contract(g, contract):
    """The graph declares exactly its contract's inputs and outputs, in order, types and shapes."""
    for what, have, want in (("inputs", g.input, contract["inputs"]), ("outputs", g.output, contract["outputs"])):
        assert [v.name for v in have] == [io["name"] for io in want], f"{what} {[v.name for v in have]} differ from the contract's"
        for vi, io in zip(have, want):
            t = vi.type.tensor_type
            assert t.elem_type == ELEM[io["type"]], f"{vi.name}: element type {t.elem_type}, contract {io['type']}"
            dims = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]
            assert dims == io["shape"], f"{vi.name}: shape {dims}, contract {io['shape']}"


def check(path, contract=None):
    # Loading by path lets the checker find external data beside the graph.
    onnx.checker.check_model(path, full_check=True)
    model = onnx.load(path)
    shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset in TARGETS, f"opset {opset} is none of famc's targets {sorted(TARGETS)}"
    assert model.ir_version == TARGETS[opset], f"ir_version {model.ir_version} with opset {opset} (want {TARGETS[opset]})"
    g = model.graph
    ops = {n.op_type for n in g.node}
    bad = ops & FORBIDDEN_OPS
    assert not bad, f"forbidden ops {sorted(bad)}"
    names = [v.name for v in list(g.input) + list(g.output)] + [n for node in g.node for n in node.output]
    for n in names:
        assert ":" not in n and "," not in n, f"tensor name {n!r} has ':' or ','"
    inputs = {i.name for i in g.input}
    for o in g.output:
        producers = [n for n in g.node if o.name in n.output]
        assert o.name not in inputs, f"output {o.name} is a graph input"
        for p in producers:
            assert not (p.op_type == "Identity" and p.input[0] in inputs), f"state input {p.input[0]} wired straight to {o.name}"
    for vi in list(g.input) + list(g.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                assert d.dim_param in ("batch", "T"), f"{vi.name}: dynamic dim {d.dim_param!r} (only batch and T may be)"
    if contract is not None:
        check_contract(g, contract)
    print(f"ok {path}: {len(g.node)} nodes, opset {[o.version for o in model.opset_import]}")


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    for arg in argv[1:]:
        try:
            graphs = graphs_of(arg)
        except Exception as e:
            print(f"FAILED {arg}: {e}", file=sys.stderr)
            return 1
        for path, contract in graphs:
            try:
                check(path, contract)
            except Exception as e:  # report which graph failed, then fail
                print(f"FAILED {path}: {e}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
