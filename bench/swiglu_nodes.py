"""The gate|up part of a decoder layer in isolation: the swiglu epilogue against the nodes it replaces.

Three graphs, each a chain of --layers gate|up SparseBinaryMatMul nodes (random packed weights of the
default model's shapes, K = 576, F = 1536 by default; a Slice back to K links the layers):

- `unfused`: the node's [T, 2F] output, then Split, Sigmoid, Mul, Mul (onnxruntime's optimiser turns
  Sigmoid + Mul into QuickGelu): the graph of op version 3;
- `swiglu`: the node with attribute activation=swiglu (docs/FORMAT.md §5 "Epilogue");
- `matmul only`: the node alone, no activation (the floor: what the epilogue itself costs is swiglu - this).

Sessions run interleaved, median of --reps runs per graph; decode (1 token) and prefill (--prefill tokens).

    .venv/bin/python bench/swiglu_nodes.py --threads 1 --json bench/results/swiglu-nodes.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from pbs2p_edge import ops
from pbs2p_edge.format import op_node_spec, pack, random_weight

GRAPHS = ("unfused", "swiglu", "matmul only")


def chain(kind: str, layers: int, k: int, f: int) -> bytes:
    weights = [pack(random_weight(f, k, 6, 8, 128, salient=1, seed=seed)) for seed in (1, 2)]
    inputs, attrs = op_node_spec(weights)
    names = [f"w.{name}" for name, _ in inputs]
    inits = [numpy_helper.from_array(array, name) for name, (_, array) in zip(names, inputs, strict=True)]
    inits += [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("s", 0), ("e", k), ("a", -1))]
    nodes, x = [], "X"
    for i in range(layers):
        if kind == "unfused":
            nodes.append(
                helper.make_node(ops.OP_TYPE, [x, *names], [f"gu{i}"], domain=ops.OP_DOMAIN, **attrs)
            )
            nodes.append(helper.make_node("Split", [f"gu{i}"], [f"g{i}", f"u{i}"], axis=-1, num_outputs=2))
            nodes.append(helper.make_node("Sigmoid", [f"g{i}"], [f"sg{i}"]))
            nodes.append(helper.make_node("Mul", [f"g{i}", f"sg{i}"], [f"a{i}"]))
            nodes.append(helper.make_node("Mul", [f"a{i}", f"u{i}"], [f"h{i}"]))
        else:
            extra = {"activation": "swiglu"} if kind == "swiglu" else {}
            node = helper.make_node(
                ops.OP_TYPE, [x, *names], [f"h{i}"], domain=ops.OP_DOMAIN, **attrs, **extra
            )
            nodes.append(node)
        nodes.append(helper.make_node("Slice", [f"h{i}", "s", "e", "a"], [f"x{i}"]))
        x = f"x{i}"
    graph = helper.make_graph(
        nodes,
        "gate_up_chain",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["t", k])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)],
        inits,
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(ops.OP_DOMAIN, ops.OP_VERSION)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    return model.SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--k", type=int, default=576)
    parser.add_argument("--f", type=int, default=1536)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--reps", type=int, default=41)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sessions = {}
    for kind in GRAPHS:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        ops.register(options)
        sessions[kind] = ort.InferenceSession(chain(kind, args.layers, args.k, args.f), options)
    results = {}
    for tokens, reps in ((1, args.reps), (args.prefill, max(3, args.reps // 6))):
        x = np.random.default_rng(0).normal(size=(tokens, args.k)).astype(np.float32)
        times: dict[str, list[float]] = {kind: [] for kind in GRAPHS}
        for _ in range(reps + 1):  # the first round is warm-up
            for kind, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {"X": x})
                times[kind].append(time.perf_counter() - start)
        ms = {kind: float(np.median(t[1:])) * 1e3 for kind, t in times.items()}
        results[tokens] = ms
        per_layer = {
            kind: 1e3 * (ms[kind] - ms["matmul only"]) / args.layers for kind in ("unfused", "swiglu")
        }
        print(
            f"{tokens} token(s), {args.threads} thread(s), {args.layers} layers, median of {reps}: "
            + ", ".join(f"{kind} {value:.3f} ms" for kind, value in ms.items())
            + f"; unfused / swiglu {ms['unfused'] / ms['swiglu']:.3f}; per layer over the matmul: unfused "
            f"{per_layer['unfused']:.1f} us, swiglu {per_layer['swiglu']:.1f} us"
        )
    if args.json:
        report = {"settings": vars(args) | {"json": str(args.json)}, "median_ms": results}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
