#!/usr/bin/env python3
"""walkaudit on a BERT-style text classifier: walk time against the paper's method (torch forward hooks), and packed
σ levels against one level at a time.

    python benchmarks/transformer.py                 # 3 runs of 1000 samples, 8 σ, 2 repeats (long: the torch side)
    python benchmarks/transformer.py --quick         # smoke run: 300 samples, 4 σ, one run
    python benchmarks/transformer.py --samples 500 --levels 6 --models /tmp/wa-models   # reuse the trained model
    python benchmarks/transformer.py --runs 5 --json transformer.json
    python benchmarks/transformer.py --seq 64 --width 128 --samples 200   # longer sequences, a wider model

The model (by default T = 32 tokens, d = 64, 4 heads, FFN 128; `--seq`, `--width`, `--layers`): token and position
embeddings, two encoder layers written as Hugging Face's current BERT writes them
(heads split by `view((*x.shape[:-1], -1, d))`, merged by `reshape(*x.shape[:-1], -1)`, an additive mask
[N, 1, 1, T] from `attention_mask`), a [CLS] head; int64 `input_ids` and `attention_mask` with dynamic batch and
sequence length, exported with the legacy exporter (and the dynamo one where onnxscript is installed, `--dynamo`).
The two attention matmuls (q·kᵀ, probs·v) are tiny modules so that the torch hooks land on every tensor that
walkaudit's default sites are: 8 sites a layer, 17 in all (two layers). The head reads position 0 ([CLS]), so
walkaudit runs the last layer's tail on that position only (`positions.keep_read_positions`); the hooks, like the
paper's code, run the whole model.

Both methods walk the same sites, the same fixed grid (`run.WALK_SIGMAS`), repeats and data; the torch reference is
`torch_reference.walk` (one full forward pass per site, σ and repeat, batch `--ref-batch`), given the two inputs
stacked as one [N, 2, T] array that the model splits. walkaudit also runs with packing off (`Worker(pack=False)`:
every σ level its own run, as most sites of such a model ran before the suffix recomputed its shape vectors,
`passes.per_sample`). Methods alternate in a rotating order; medians over the runs.

Not a test: nothing is asserted; the ratio is printed against the ≥ 4x target.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import run  # noqa: E402  (sets the thread count before numpy and torch load)
import torch  # noqa: E402
import torch_reference  # noqa: E402
from torch import nn  # noqa: E402

import walkaudit  # noqa: E402
from walkaudit._execution import worker as worker_mod  # noqa: E402
from walkaudit._graph.sites import Selection, select  # noqa: E402
from walkaudit._loading.model import load_model  # noqa: E402

VOCAB, T, D, HEADS, FFN, LAYERS, CLASSES = 200, 32, 64, 4, 128, 2, 4  # the defaults; --seq, --width, --layers


def configure(seq: int, width: int, layers: int) -> str:
    """Set the model's sequence length, width (FFN = 2·width) and depth; the tag that names its cached files."""
    global T, D, FFN, LAYERS
    T, D, FFN, LAYERS = seq, width, 2 * width, layers
    return "" if (seq, width, layers) == (32, 64, 2) else f".t{seq}d{width}l{layers}"


class MatMul(nn.Module):
    """a @ b as a module, so that a forward hook sees its output (walkaudit's MatMul sites)."""

    def forward(self, a, b):
        return a @ b


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.scores, self.context = MatMul(), MatMul()

    def forward(self, x, mask):
        input_shape = x.shape[:-1]
        heads = (*input_shape, -1, D // HEADS)
        q, k, v = (f(x).view(heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        probs = (self.scores(q, k.transpose(-1, -2)) / math.sqrt(D // HEADS) + mask).softmax(-1)
        return self.o(self.context(probs, v).transpose(1, 2).reshape(*input_shape, -1))


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.att, self.norm1, self.norm2 = SelfAttention(), nn.LayerNorm(D), nn.LayerNorm(D)
        self.ffn1, self.ffn2 = nn.Linear(D, FFN), nn.Linear(FFN, D)

    def forward(self, x, mask):
        x = self.norm1(x + self.att(x, mask))
        return self.norm2(x + self.ffn2(nn.functional.gelu(self.ffn1(x))))


class Bert(nn.Module):
    """BERT-style classifier; called with one [N, 2, T] array (the torch reference) it splits it into the two."""

    def __init__(self):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(VOCAB, D), nn.Embedding(T, D)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.head = nn.Linear(D, CLASSES)

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            input_ids, attention_mask = input_ids[:, 0], input_ids[:, 1]
        x = self.tokens(input_ids) + self.positions(torch.arange(input_ids.shape[1]).unsqueeze(0))
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, mask)
        return self.head(x[:, 0])


def synthetic_text(samples: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, labels): padded sequences of T/4 to T tokens (8–32 by default); the class is which
    of four token groups occurs most often, so that the model must attend over the whole sequence."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(T // 4, T + 1, samples)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, VOCAB, (samples, T)) * mask
    ids[:, 0] = 1  # [CLS]
    groups = np.stack([((ids % CLASSES == c) & (mask == 1)).sum(1) for c in range(CLASSES)], 1)
    return ids, mask, groups.argmax(1).astype(np.int64)


def build(folder: Path, samples: int, dynamo: bool, tag: str = "") -> run.models.Bench:
    """Train the model briefly (seeded), export it into `folder`; the Bench holds the evaluation data as one
    [N, 2, T] array (input_ids, attention_mask), which the torch model splits (`Bert.forward`)."""
    torch.manual_seed(0)
    model = Bert()
    ids, mask, y = synthetic_text(2000, seed=1)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for _ in range(3):
        for i in range(0, len(ids), 64):
            batch = [torch.from_numpy(a[i : i + 64]) for a in (ids, mask, y)]
            loss = nn.functional.cross_entropy(model(batch[0], batch[1]), batch[2])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    example = (torch.from_numpy(ids[:4]), torch.from_numpy(mask[:4]))
    names = ["input_ids", "attention_mask"]
    path = folder / f"bert.{'dynamo' if dynamo else 'legacy'}{tag}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=2, max=T)
            program = torch.onnx.export(model, example, dynamo=True, input_names=names, output_names=["logits"],
                                        dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
            program.save(str(path))
        else:
            axes = {0: "batch", 1: "seq"}
            buffer = io.BytesIO()
            torch.onnx.export(model, example, buffer, dynamo=False, input_names=names, output_names=["logits"],
                              dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": {0: "batch"}},
                              opset_version=run.models.OPSET)
            import onnx

            proto = onnx.load_from_string(buffer.getvalue())
            proto.ir_version = min(proto.ir_version, run.models.MAX_IR_VERSION)
            onnx.save(proto, path)
    ids, mask, y = synthetic_text(samples, seed=2)
    return run.models.Bench("BERT-style", model, path, np.stack([ids, mask], 1), y, torch_modules(model))


def torch_modules(model: Bert) -> list[str]:
    """Module names hooked, in graph order (walkaudit's default sites of the export, one to one)."""
    names = []
    for i in range(LAYERS):
        att = f"layers.{i}.att"
        names += [f"{att}.{m}" for m in ("q", "k", "v", "scores", "context", "o")]
        names += [f"layers.{i}.ffn1", f"layers.{i}.ffn2"]
    return names + ["head"]


def onnx_sites(path: Path, modules: list[str]) -> list[str]:
    """walkaudit's default sites of the export, one per hooked module, in the modules' order. The legacy exporter
    scopes names by module path (`/layers.0/att/q/Add_output_0`) and they are matched by it; the dynamo exporter's
    names (`linear_3`) are not, so they are matched by graph order, which is the modules' call order."""
    loaded = load_model(str(path))
    names = [s.name for s in select(loaded.proto, loaded.types, Selection())]
    if len(names) != len(modules):
        raise SystemExit(f"walkaudit's {len(names)} default sites {names} are not the {len(modules)} hooked modules")
    if not names[0].startswith("/"):
        return names

    def scope(module: str) -> str:  # layers.0.att.q -> /layers.0/att/q/
        first, index, rest = module.split(".", 2)
        return f"/{first}.{index}/{rest.replace('.', '/')}/"

    matched = ["logits" if m == "head" else next((n for n in names if n.startswith(scope(m))), None)
               for m in modules]
    if None in matched or sorted(matched) != sorted(names):
        raise SystemExit(f"cannot match the hooked modules {modules} to walkaudit's sites {names}")
    return matched


def walkaudit_walk(path: Path, inputs: dict, y: np.ndarray, sigmas, repeats: int, pack: bool = True):
    """Seconds and accuracy per (site, σ) of walkaudit.audit on the fixed grid; `pack` False runs every σ level on
    its own (the Worker's option, set for the length of the call)."""
    defaults = worker_mod.Worker.__init__.__kwdefaults__
    old = defaults["pack"]
    defaults["pack"] = pack
    try:
        started = time.perf_counter()
        report = walkaudit.audit(str(path), inputs, y, sigmas=tuple(sigmas), repeats=repeats, threads=run.THREADS,
                                 provider="cpu", noise="additive")
        seconds = time.perf_counter() - started
    finally:
        defaults["pack"] = old
    unpacked = sum(any("tiled batch" in n for n in s.get("notes") or ()) for s in report.to_dict()["sites"])
    return seconds, {s.name: [p.accuracy for p in s.points] for s in report.sites}, unpacked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 samples, 4 σ levels, one run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--levels", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ref-batch", type=int, default=1000, help="batch of the torch reference")
    parser.add_argument("--dynamo", action="store_true", help="export with the dynamo exporter (needs onnxscript)")
    parser.add_argument("--seq", type=int, default=32, help="tokens per sequence (lengths drawn from T/4 to T)")
    parser.add_argument("--width", type=int, default=64, help="hidden size d (4 heads, FFN 2·d)")
    parser.add_argument("--layers", type=int, default=2, help="encoder layers")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--models", type=Path, help="keep the built network here and reuse it on the next run")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.levels, args.runs = 300, 4, 1
    tag = configure(args.seq, args.width, args.layers)
    torch.set_num_threads(run.THREADS)
    torch.set_num_interop_threads(1)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="walkaudit-transformer-") as tmp:
        t0 = time.perf_counter()
        exporter = "dynamo" if args.dynamo else "legacy"
        if args.models:
            bench = run.cached_bench(args.models, f"bert.{exporter}.{args.samples}{tag}",
                                     lambda: build(args.models, args.samples, args.dynamo, tag))
        else:
            bench = build(Path(tmp), args.samples, args.dynamo, tag)
        model, path, y = bench.torch_model, Path(bench.onnx_path), bench.y
        ids, mask = bench.x[:, 0], bench.x[:, 1]
        with torch.inference_mode():
            clean = model(torch.from_numpy(ids), torch.from_numpy(mask)).argmax(1).numpy()
        run.log(f"built {path.name} in {time.perf_counter() - t0:.0f}s: accuracy {np.mean(clean == y):.3f} on "
                f"{len(y)} samples (chance {np.bincount(y).max() / len(y):.3f})")
        sites = onnx_sites(path, bench.sites)  # the same sites on both sides
        modules = bench.site_modules()
        inputs = {"input_ids": np.ascontiguousarray(ids), "attention_mask": np.ascontiguousarray(mask)}
        sigmas = np.logspace(*run.WALK_SIGMAS, args.levels)
        walkaudit_walk(path, {k: v[:128] for k, v in inputs.items()}, y[:128], sigmas[:2], 1)  # warm-up, untimed
        rows = []
        methods = ["walkaudit", "torch", "walkaudit-unpacked"]
        for r in range(args.runs):
            order = methods[r % 3:] + methods[: r % 3]  # rotate who goes first: the machine is shared and drifts
            t, acc, unpacked = {}, {}, {}
            for method in order:
                if method == "torch":
                    a, _, t[method] = torch_reference.walk(model, modules, bench.x, y, sigmas, args.repeats,
                                                           batch=args.ref_batch, seed=r)
                    acc[method] = a.mean(axis=2)
                else:
                    t[method], by_site, unpacked[method] = walkaudit_walk(path, inputs, y, sigmas, args.repeats,
                                                                          pack=method == "walkaudit")
                    acc[method] = np.array([by_site[s] for s in sites])
            row = {"order": order, "seconds": t, "torch_ratio": t["torch"] / t["walkaudit"],
                   "packing_ratio": t["walkaudit-unpacked"] / t["walkaudit"],
                   "unpacked_sites": unpacked["walkaudit"],
                   "acc_gap_torch": float(np.abs(acc["torch"] - acc["walkaudit"]).mean()),
                   "acc_gap_unpacked": float(np.abs(acc["walkaudit-unpacked"] - acc["walkaudit"]).max()),
                   "load_average": run.os.getloadavg()[0]}
            rows.append(row)
            run.log(f"  run {r + 1}: " + ", ".join(f"{m} {t[m]:.1f}s" for m in order) +
                    f"  torch/walkaudit {row['torch_ratio']:.2f}x  unpacked/packed {row['packing_ratio']:.2f}x"
                    f"  sites not packed {row['unpacked_sites']}/{len(sites)}  mean |Δacc| vs torch "
                    f"{row['acc_gap_torch']:.3f}  load {row['load_average']:.1f}")
    ratio, packing = run.median(r["torch_ratio"] for r in rows), run.median(r["packing_ratio"] for r in rows)
    seconds = {m: run.median(r["seconds"][m] for r in rows) for m in methods}
    print(f"| figure | model | target | measured (median of {len(rows)}) | detail | met |")
    print("|---|---|---|---|---|---|")
    print(f"| walk: torch hooks / walkaudit | BERT-style ({path.name.split('.')[1]}; T = {T}, d = {D}, {LAYERS} layers)"
          f" | ≥ 4x | {ratio:.2f}x | "
          f"{len(sites)} sites × {len(sigmas)} σ × {args.repeats} rep, {len(y)} samples; runs "
          f"{min(r['torch_ratio'] for r in rows):.2f}–{max(r['torch_ratio'] for r in rows):.2f}x; "
          f"{seconds['torch']:.1f}s vs {seconds['walkaudit']:.1f}s | {'yes' if ratio >= 4 else 'NO'} |")
    print(f"| walk: packing off / on | BERT-style | (before / after) | {packing:.2f}x | "
          f"{seconds['walkaudit-unpacked']:.1f}s vs {seconds['walkaudit']:.1f}s; same counts "
          f"(max |Δacc| {max(r['acc_gap_unpacked'] for r in rows):.3f}) | |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": rows,
                                         "torch_ratio": ratio, "packing_ratio": packing, "seconds": seconds},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
