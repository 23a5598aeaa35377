"""A naive onnxruntime walk, the second reference: one rewritten session per (site, σ), noise drawn in the graph.

For each site and each σ the model is rewritten so that the site's producer writes `<site>.clean` and three new nodes
compute `site = <site>.clean + σ · RandomNormalLike(<site>.clean)` (σ a constant baked into the graph; opset ≤ 21,
where onnxruntime has a RandomNormalLike kernel); a session is created for it, and every repeat is a full pass over
the data from the input (the node draws anew on every run). No prefix reuse, no packing of σ levels, no common
random numbers: what one would write first with onnxruntime alone.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def with_noise(model: onnx.ModelProto, site: str, sigma: float, seed: float) -> onnx.ModelProto:
    """A copy of `model` with additive in-graph noise of std σ at tensor `site`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    clean = f"{site}.clean"
    at = next(i for i, n in enumerate(graph.node) if site in n.output)
    producer = graph.node[at]
    producer.output[list(producer.output).index(site)] = clean
    graph.initializer.append(numpy_helper.from_array(np.array(sigma, np.float32), f"{site}.sigma"))
    new = [
        helper.make_node("RandomNormalLike", [clean], [f"{site}.eps"], dtype=TensorProto.FLOAT, seed=seed),
        helper.make_node("Mul", [f"{site}.eps", f"{site}.sigma"], [f"{site}.noise"]),
        helper.make_node("Add", [clean, f"{site}.noise"], [site]),
    ]
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes[: at + 1] + new + nodes[at + 1 :])
    return out


def walk(model_path, sites: list[str], x: np.ndarray, y: np.ndarray | None, sigmas, repeats: int,
         batch: int = 1000, threads: int = 2) -> tuple[np.ndarray, float]:
    """Accuracy [sites, levels, repeats] and seconds (clean pass, rewriting and session creation included)."""
    started = time.perf_counter()
    model = onnx.load(str(model_path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    name_in = model.graph.input[0].name
    name_out = model.graph.output[0].name
    batches = [x[i : i + batch] for i in range(0, len(x), batch)]
    clean = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    pred = np.concatenate([clean.run([name_out], {name_in: xb})[0].argmax(1) for xb in batches])
    target = pred if y is None else y
    targets = [target[i : i + batch] for i in range(0, len(x), batch)]
    acc = np.zeros((len(sites), len(sigmas), repeats))
    for s, site in enumerate(sites):
        for li, sigma in enumerate(sigmas):
            noisy = with_noise(model, site, float(sigma), seed=float(1000 * s + li))
            session = ort.InferenceSession(noisy.SerializeToString(), options, providers=providers)
            for r in range(repeats):
                correct = 0
                for xb, tb in zip(batches, targets):
                    correct += int((session.run([name_out], {name_in: xb})[0].argmax(1) == tb).sum())
                acc[s, li, r] = correct / len(x)
    return acc, time.perf_counter() - started
