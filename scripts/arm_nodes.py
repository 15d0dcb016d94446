"""Where do x86-64 and arm64 part ways? Every node output of one prefill, on both machines, compared.

`make test-arm` found that the default model's PBS2P bundle gives different greedy tokens on x86-64 and on
arm64 (docs/DEPLOY.md). This script locates the first difference node by node:

    python scripts/arm_nodes.py instrument BUNDLE WORK      # x86 (needs onnx): WORK/nodes.onnx exposes every node output
    python scripts/arm_nodes.py run WORK --out x86.npz      # torch-free, on x86
    python scripts/arm_nodes.py run WORK --out arm.npz --replay x86.npz   # inside the arm64 rootfs
    python scripts/arm_nodes.py compare WORK x86.npz arm.npz [--md report.md]

`run` uses no graph optimisation on either machine, so both execute the same nodes; the SparseBinaryMatMul nodes
use the ops library the runtime would register (PBS2P_EDGE_OPS_LIBRARY to override). `compare` walks the nodes
in graph order and reports, per op type, how many outputs are bit-identical, the first node that is not, and for
the custom nodes whether identical inputs gave identical outputs (the kernels' claim of identical arithmetic).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

PROMPT_IDS = [1, 504, 3458, 282, 4649, 314, 3287, 30, 378, 2626, 314, 253, 1345, 282, 7406, 28]
CUSTOM_OP = "SparseBinaryMatMul"


def instrument(bundle: Path, work: Path) -> None:
    import onnx

    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    known = {o.name for o in model.graph.output}
    nodes = []
    for node in model.graph.node:
        nodes.append(
            {"name": node.name, "op": node.op_type, "inputs": list(node.input), "outputs": list(node.output)}
        )
        for name in node.output:
            if name and name not in known:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
                known.add(name)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "model.onnx.data"
    if not data.exists():
        os.link(bundle / "model.onnx.data", data) if _same_device(bundle, work) else data.write_bytes(
            (bundle / "model.onnx.data").read_bytes()
        )
    onnx.save(model, str(work / "nodes.onnx"))
    (work / "nodes.json").write_text(json.dumps(nodes))
    onnx.save(
        _custom_only(onnx.load(str(bundle / "model.onnx"), load_external_data=False)),
        str(work / "custom.onnx"),
    )


def _custom_only(model: Any) -> Any:
    """The SparseBinaryMatMul nodes alone, each one's X a graph input: fed the same X on both machines."""
    import onnx

    graph = model.graph
    keep = [node for node in graph.node if node.op_type == CUSTOM_OP]
    used = {name for node in keep for name in node.input[1:]}
    inits = [init for init in graph.initializer if init.name in used]
    xs = list(dict.fromkeys(node.input[0] for node in keep))  # q/k/v share one X
    inputs = [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in xs]
    outputs = [
        onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None) for node in keep
    ]
    new = onnx.helper.make_graph(keep, "custom_nodes", inputs, outputs, inits)
    return onnx.helper.make_model(new, opset_imports=model.opset_import, ir_version=model.ir_version)


def _same_device(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


def run(work: Path, out: Path, replay: Path | None = None) -> None:
    for name in ("nodes.onnx", "custom.onnx"):
        if not (work / name).is_file():
            raise ValueError(f"{work / name} is missing: run `arm_nodes.py instrument BUNDLE {work}` first")
    import onnxruntime as ort

    from pbs2p_edge import ops

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.register_custom_ops_library(str(ops.library_path()))
    session = _session(work / "nodes.onnx", options)
    ids = np.array([PROMPT_IDS], dtype=np.int64)
    feeds: dict[str, Any] = {}
    for item in session.get_inputs():
        if item.name == "input_ids":
            feeds[item.name] = ids
        elif item.name == "attention_mask":
            feeds[item.name] = np.ones_like(ids)
        elif item.name == "position_ids":
            feeds[item.name] = np.arange(ids.shape[1], dtype=np.int64)[None]
        else:  # an empty past: [1, kv_heads, 0, head_dim]
            shape = [d if isinstance(d, int) else 0 for d in item.shape]
            shape[0] = 1
            feeds[item.name] = np.zeros(shape, dtype=np.float32)
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, feeds), strict=True))
    if replay is not None:  # the custom nodes alone, fed the other machine's recorded X
        recorded = np.load(replay)
        custom = _session(work / "custom.onnx", options)
        custom_feeds = {i.name: recorded[i.name] for i in custom.get_inputs()}
        custom_names = [o.name for o in custom.get_outputs()]
        values.update(
            {
                f"replay:{n}": v
                for n, v in zip(custom_names, custom.run(custom_names, custom_feeds), strict=True)
            }
        )
    np.savez(out, **values)


def _session(path: Path, options: Any) -> Any:
    """An onnxruntime session of `path`; its load failure becomes a ValueError (one line at the CLI)."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"onnxruntime cannot load {path}: {first}") from None


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)) if a.size else 0.0


def compare(work: Path, x86_path: Path, arm_path: Path) -> str:
    nodes = json.loads((work / "nodes.json").read_text())
    x86, arm = np.load(x86_path), np.load(arm_path)
    per_op: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    first = None
    custom_same_in = custom_same_out = 0
    worst_custom_in = 0.0
    for index, node in enumerate(nodes):
        outs = [n for n in node["outputs"] if n in x86.files]
        if not outs:
            continue
        same = all(_same(x86[n], arm[n]) for n in outs)
        per_op[node["op"]][0] += 1
        per_op[node["op"]][1] += same
        if not same and first is None:
            first = (index, node, max(_rel(x86[n], arm[n]) for n in outs))
        if node["op"] == CUSTOM_OP:
            x_name = node["inputs"][0]
            inputs_same = x_name not in x86.files or _same(x86[x_name], arm[x_name])
            if inputs_same:
                custom_same_in += 1
                custom_same_out += same
            else:
                worst_custom_in = max(worst_custom_in, _rel(x86[x_name], arm[x_name]))
    logits = "logits" if "logits" in x86.files else None
    lines = [
        "# x86-64 vs arm64 (qemu-user), node by node: `scripts/arm_nodes.py`",
        "",
        f"Prefill of {len(PROMPT_IDS)} tokens, no graph optimisation on either machine, {len(nodes)} nodes.",
        "",
        "| op type | nodes | outputs bit-identical x86 = arm64 |",
        "|---|---|---|",
    ]
    for op, (count, same) in sorted(per_op.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {op} | {count} | {same} |")
    lines.append("")
    if first is None:
        lines.append("Every node output is bit-identical.")
    else:
        index, node, rel = first
        lines.append(
            f"First differing node: #{index} `{node['name']}` ({node['op']}), max |diff| / max |x86| = {rel:.2e}."
        )
    lines.append(
        f"{CUSTOM_OP} nodes whose input X was bit-identical on both machines: {custom_same_in}; of them with "
        f"bit-identical outputs: {custom_same_out}. Largest relative input difference of the others: "
        f"{worst_custom_in:.2e}."
    )
    replayed = [n[len("replay:") :] for n in arm.files if n.startswith("replay:")]
    if replayed:
        same = sum(_same(x86[n], arm[f"replay:{n}"]) for n in replayed)
        worst = max(_rel(x86[n], arm[f"replay:{n}"]) for n in replayed)
        lines.append(
            f"{CUSTOM_OP} nodes run alone on arm64 with x86's recorded inputs: {same} of {len(replayed)} outputs "
            f"bit-identical to x86's (largest relative difference {worst:.2e})."
        )
    if logits:
        a, b = x86[logits].astype(np.float64), arm[logits].astype(np.float64)
        noise = ((a - b) ** 2).sum()
        sqnr = f"SQNR {10 * np.log10((a**2).sum() / noise):.1f} dB" if noise else "identical"
        lines.append(f"Logits: max |diff| {np.abs(a - b).max():.3g}, {sqnr}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("instrument")
    p.add_argument("bundle", type=Path)
    p.add_argument("work", type=Path)
    p = sub.add_parser("run")
    p.add_argument("work", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--replay", type=Path, help="also run the custom nodes alone on this recording's inputs")
    p = sub.add_parser("compare")
    p.add_argument("work", type=Path)
    p.add_argument("x86", type=Path)
    p.add_argument("arm", type=Path)
    p.add_argument("--md", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "instrument":
            instrument(args.bundle, args.work)
        elif args.command == "run":
            run(args.work, args.out, args.replay)
        else:
            report = compare(args.work, args.x86, args.arm)
            print(report, end="")
            if args.md:
                args.md.write_text(report)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
