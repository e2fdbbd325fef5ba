#!/usr/bin/env python3
"""Makes the golden ONNX test cases under tests/data/onnx/ (used by tests/runtime.rs).

Run from anywhere with the project's venv:  .venv/bin/python tests/data/onnx/make.py

Needs `onnx` and `numpy` only: every expected output is computed here with numpy, never by an
ONNX runtime, so the cases check tract and ONNX Runtime against an independent reference.

Cases (each a folder with `model.onnx`, `io.json`):
- tiny_mlp: Gather(int64 ids) + x -> MatMul + Add -> (logits, Softmax); symbolic dims `batch`, `T`;
- ext_data: the same kind of graph with its weights in ONNX external data `model.onnx.data`;
- no_inputs: an init-style graph with no inputs (Tanh of a constant, and a Softmax of it).

`io.json` holds a list of runs: {"inputs": [{"name", "dtype", "shape", "data"}],
"outputs": [{"name", "shape", "data"}]}, data flattened in C order.
"""

import json
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
IR_VERSION = 10
OPSET = 17


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def finish(graph, name):
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="famc-tests",
    )
    model.doc_string = f"famc runtime test case {name}"
    onnx.checker.check_model(model)
    return model


def tensor_json(name, arr):
    arr = np.ascontiguousarray(arr)
    dtype = {np.dtype("float32"): "f32", np.dtype("int64"): "i64"}[arr.dtype]
    data = [float(v) for v in arr.reshape(-1)] if dtype == "f32" else [int(v) for v in arr.reshape(-1)]
    return {"name": name, "dtype": dtype, "shape": list(arr.shape), "data": data}


def write_case(name, model, runs, external=False):
    d = os.path.join(HERE, name)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "model.onnx")
    if external:
        data = os.path.join(d, "model.onnx.data")
        if os.path.exists(data):
            os.remove(data)
        onnx.save_model(
            model,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="model.onnx.data",
            size_threshold=0,
        )
        os.chmod(data, 0o644)
    else:
        onnx.save_model(model, path)
    onnx.checker.check_model(path)
    io = {
        "runs": [
            {
                "inputs": [tensor_json(n, a) for n, a in r["inputs"]],
                "outputs": [tensor_json(n, a) for n, a in r["outputs"]],
            }
            for r in runs
        ]
    }
    with open(os.path.join(d, "io.json"), "w") as f:
        json.dump(io, f, indent=None, separators=(",", ":"))
        f.write("\n")


def mlp_graph(name, emb, w, b):
    """input_ids int64 [batch, T], x float32 [batch, T, D] -> logits, probs float32 [batch, T, H]."""
    V, D = emb.shape
    H = w.shape[1]
    inits = [
        numpy_helper.from_array(emb, "emb"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(b, "b"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["e"], axis=0, name="gather"),
        helper.make_node("Add", ["e", "x"], ["h"], name="add_x"),
        helper.make_node("MatMul", ["h", "w"], ["hw"], name="matmul"),
        helper.make_node("Add", ["hw", "b"], ["logits"], name="add_b"),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        inputs=[
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "T"]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "T", D]),
        ],
        outputs=[
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "T", H]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", "T", H]),
        ],
        initializer=inits,
    )
    return finish(graph, name)


def mlp_runs(rng, emb, w, b, sizes):
    V, D = emb.shape
    runs = []
    for batch, T in sizes:
        ids = rng.integers(0, V, size=(batch, T)).astype(np.int64)
        x = rng.standard_normal((batch, T, D)).astype(np.float32)
        h = emb.astype(np.float64)[ids] + x.astype(np.float64)
        logits = h @ w.astype(np.float64) + b.astype(np.float64)
        probs = softmax(logits)
        runs.append(
            {
                "inputs": [("input_ids", ids), ("x", x)],
                "outputs": [
                    ("logits", logits.astype(np.float32)),
                    ("probs", probs.astype(np.float32)),
                ],
            }
        )
    return runs


def main():
    rng = np.random.default_rng(20240531)

    # tiny_mlp: V=11, D=4, H=6; several (batch, T) sizes driven through one session.
    emb = rng.standard_normal((11, 4)).astype(np.float32)
    w = (rng.standard_normal((4, 6)) * 0.5).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    write_case(
        "tiny_mlp",
        mlp_graph("tiny_mlp", emb, w, b),
        mlp_runs(rng, emb, w, b, [(2, 3), (1, 5), (3, 1), (2, 7)]),
    )

    # ext_data: larger-ish weights stored in model.onnx.data beside the graph.
    emb = rng.standard_normal((37, 16)).astype(np.float32)
    w = (rng.standard_normal((16, 9)) * 0.25).astype(np.float32)
    b = rng.standard_normal(9).astype(np.float32)
    write_case(
        "ext_data",
        mlp_graph("ext_data", emb, w, b),
        mlp_runs(rng, emb, w, b, [(1, 4), (3, 2)]),
        external=True,
    )

    # no_inputs: like init.onnx, outputs depend on the weights only.
    c = rng.standard_normal((3, 5)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Tanh", ["c"], ["init_fam.0"], name="tanh"),
            helper.make_node("Softmax", ["init_fam.0"], ["init_fam.1"], axis=-1, name="softmax"),
        ],
        "no_inputs",
        inputs=[],
        outputs=[
            helper.make_tensor_value_info("init_fam.0", TensorProto.FLOAT, [3, 5]),
            helper.make_tensor_value_info("init_fam.1", TensorProto.FLOAT, [3, 5]),
        ],
        initializer=[numpy_helper.from_array(c, "c")],
    )
    t = np.tanh(c.astype(np.float64))
    write_case(
        "no_inputs",
        finish(graph, "no_inputs"),
        [{"inputs": [], "outputs": [("init_fam.0", t.astype(np.float32)), ("init_fam.1", softmax(t).astype(np.float32))]}],
    )


if __name__ == "__main__":
    main()
