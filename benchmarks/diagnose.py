#!/usr/bin/env python3
"""Micro-measurements behind the diagnosis in docs/performance.md (ResNet-8, 2 threads, ~1 min):

    python benchmarks/diagnose.py

1. onnxruntime optimisations: the whole model and every suffix with onnxruntime's default optimisations, with the
   fusions walkaudit always disables (walkaudit._execution.runtime.FUSIONS_OFF), with its exact-mode set (EXACT), and
   with each member of EXACT disabled alone.
2. The cache fill: one run of the clean model with every site exposed, asking for all outputs, for one, for the
   logits only; the plain model; and a prefix model that computes only the first site (what walkaudit's per-site
   prefix sessions do).
3. Normal numbers: walkaudit's NormalSource (1 and 2 threads), its Box–Muller transform and numpy's ziggurat on one
   thread, torch.randn, onnxruntime's RandomNormalLike.
4. Applying the noise for the stem (K = 8 levels of 256 rows): in the graph from a fed ε (what FedSuffix does)
   against numpy on the host (NoiseModel.host: HostApplied, the path for models before opset 10).
5. The clean model as the worker runs it: exact (NCHWc off: how the clean pass and the prefixes run since the
   units-of-work core) against walkaudit's default session options, with every site and frontier exposed.
Medians of 5 timed calls after one warm-up call.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import models

from walkaudit._execution import runtime as wa_runtime
from walkaudit._graph import passes as rewrite
from walkaudit._graph.index import GraphIndex
from walkaudit._graph.sites import Selection, select
from walkaudit._loading.model import load_model
from walkaudit._noise import NormalSource, box_muller, make_noise

THREADS = 2


def timed(fn, n: int = 5) -> float:
    """Median milliseconds of n calls after a warm-up."""
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def session(proto: onnx.ModelProto, disabled=()):
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled))


def main() -> None:
    torch.set_num_threads(THREADS)
    folder = Path(tempfile.mkdtemp(prefix="walkaudit-diagnose-"))
    bench = models.resnet8(folder, 256)
    loaded = load_model(str(bench.onnx_path))
    sites = select(loaded.proto, loaded.types, Selection())
    x = np.concatenate([bench.x] * 8)  # 2048 rows: 8 σ levels of a 256-sample batch
    print(f"ResNet-8, {len(x)} rows per run, {THREADS} threads, load average {os.getloadavg()[0]:.1f}\n")

    print("1. onnxruntime graph optimisations (ms per run)")
    exact = list(getattr(wa_runtime, "EXACT", []))
    sets = {"onnxruntime default": []}
    if hasattr(wa_runtime, "FUSIONS_OFF"):
        sets["walkaudit default (FUSIONS_OFF)"] = list(wa_runtime.FUSIONS_OFF)
    sets["walkaudit exact (EXACT)"] = exact
    sets.update({f"{n} off": [n] for n in exact})
    def whole(d):
        return timed(lambda: session(loaded.proto, d).run(None, {'x': x}) and None)
    print("   whole model: " + ", ".join(f"{k} {whole(d):.0f}" for k, d in sets.items()))
    names = [s.name for s in sites]
    index = GraphIndex(loaded.proto.graph)
    needed = names + [f for s in names for f in index.suffix_plan(s, "logits")[1]]
    exposed = session(rewrite.expose(loaded.proto, needed, loaded.types))
    outputs = [o.name for o in exposed.get_outputs()]
    values = dict(zip(outputs, exposed.run(outputs, {"x": x})))
    totals = dict.fromkeys(sets, 0.0)
    for site in sites[:-1]:
        suffix = rewrite.suffix(loaded.proto, site.name, "logits", loaded.types)
        feeds = {n: values[n] for n in (site.name, *suffix.frontier)}
        row = {}
        for k, disabled in sets.items():
            sess = session(suffix.model, disabled)
            row[k] = timed(lambda sess=sess, feeds=feeds: sess.run(None, feeds))
            totals[k] += row[k]
        print(f"   suffix after {site.name}: " + ", ".join(f"{k} {v:.0f}" for k, v in row.items()))
    print("   sum of suffixes: " + ", ".join(f"{k} {v:.0f}" for k, v in totals.items()))

    print("\n2. clean values for the cache (ms per run of 256 rows)")
    xb = bench.x[:256]
    plain = session(loaded.proto)
    stem = names[0]
    prefix = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(loaded.proto)).extract_model(["x"], [stem])
    pre = session(prefix)
    print(f"   plain model {timed(lambda: plain.run(None, {'x': xb})):.1f}; exposed model: all {len(outputs)} outputs "
          f"{timed(lambda: exposed.run(outputs, {'x': xb})):.1f}, the stem only "
          f"{timed(lambda: exposed.run([stem], {'x': xb})):.1f}, the logits only "
          f"{timed(lambda: exposed.run(['logits'], {'x': xb})):.1f}; prefix model up to the stem "
          f"{timed(lambda: pre.run(None, {'x': xb})):.1f}")

    print("\n3. standard normal float32 (million values per second)")
    shape = (1, 1, 256, 16, 32, 32)
    count = int(np.prod(shape))
    for threads in (1, 2):
        src = NormalSource(0, threads)
        keys = iter(range(100))
        print(f"   NormalSource({threads} thread{'s' if threads > 1 else ''}): "
              f"{count / timed(lambda src=src, keys=keys: src.normal(shape, (0, next(keys)))) / 1e3:.0f}")
        src.close()
    rng = np.random.default_rng(0)
    out = np.empty(count, np.float32)
    print(f"   numpy standard_normal (float32 ziggurat), one thread: "
          f"{count / timed(lambda: rng.standard_normal(out=out, dtype=np.float32)) / 1e3:.0f}")
    print(f"   walkaudit._noise.box_muller, one thread: {count / timed(lambda: box_muller(rng, out)) / 1e3:.0f}")
    print(f"   torch.randn: {count / timed(lambda: torch.randn(count)) / 1e3:.0f}")
    graph = helper.make_graph(
        [helper.make_node("RandomNormalLike", ["y"], ["e"], dtype=TensorProto.FLOAT)], "rng",
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [None])])
    rnl = session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    y = np.zeros(count, np.float32)
    print(f"   onnxruntime RandomNormalLike: {count / timed(lambda: rnl.run(None, {'y': y})) / 1e3:.0f}")

    print("\n4. applying the noise for the stem, K = 8 levels of 256 rows (ms)")
    noise = make_noise("additive")
    site_value = np.ascontiguousarray(values[stem][:256])
    eps = NormalSource(0, 1).normal((1, 1, *site_value.shape), (0,))
    sigmas = np.logspace(-1, 1, 8)
    spec = loaded.types[stem]
    io = helper.make_tensor_value_info(stem, spec.elem_type, [None] * len(spec.shape))
    bare = helper.make_model(helper.make_graph([], "apply", [io], [io]), opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=8)  # an empty suffix: the program is the noise prologue alone
    program = rewrite.graph_noise(rewrite.Suffix(bare, stem, ()), loaded.types, False, True, fed=True)
    prologue = session(program.model)
    feeds = {program.site: site_value, program.eps_add: eps[0],
             program.sigma_add: sigmas.astype(np.float32).reshape(-1, 1, 1, 1, 1)}
    source = NormalSource(0, THREADS)

    def on_host():  # HostApplied (models before opset 10): numpy, level by level on the noise threads
        return noise.host(site_value, sigmas, eps, source.map)

    assert np.array_equal(prologue.run([stem], feeds)[0], on_host().reshape(8 * 256, *site_value.shape[1:]))
    in_graph = timed(lambda: prologue.run([stem], feeds))
    print(f"   in the graph (passes.graph_noise, fed ε; the default): {in_graph:.0f}; "
          f"on the host (NoiseModel.host, {THREADS} threads): {timed(on_host):.0f}")
    source.close()

    print("\n5. the clean model with every site and frontier exposed, as the clean pass runs it "
          "(ms per run of 256 rows)")
    runtime = wa_runtime.Runtime("cpu", THREADS)
    proto = rewrite.expose(loaded.proto, needed, loaded.types)
    wanted = [o.name for o in session(proto).get_outputs()]
    for label, exact in (("exact=True (the clean pass and prefixes now)", True),
                         ("walkaudit default (NCHWc on)", False)):
        sess = runtime.session(proto, "clean model", exact=exact)
        print(f"   {label}: {timed(lambda sess=sess: sess.run(wanted, {'x': xb})):.1f}")


if __name__ == "__main__":
    main()
