"""The models people deploy, audited on a laptop-size machine: sites, wall time, peak memory, cost ratio.

Two steps, in two environments (the suite and walkaudit stay torch-free):

    # 1. build: torch + torchvision in a venv of their own; random weights (nothing downloads), BatchNorm statistics
    #    from the data (train mode, momentum=None) so that the models do not predict one class; ONNX + data to --out
    #    (torchvision, timm, and Hugging Face transformers models built from their configs)
    /work/tvenv/bin/python benchmarks/zoo.py build --out /work/zoo
    # 1b. INT8 QDQ of the float models in QUANTIZED (walkaudit's venv: onnxruntime.quantization), and the check that
    #     walkaudit's clean pass predicts what a plain session of each does
    python benchmarks/zoo.py quantize --zoo /work/zoo
    python benchmarks/zoo.py deployed --zoo /work/zoo
    # 2. run: walkaudit's venv; each model audited in a child process of its own, beside a plain onnxruntime session
    python benchmarks/zoo.py run --zoo /work/zoo --json zoo.json

Per model, `run` reports: the sites, the audit's wall time and peak RSS (the child's VmHWM, with a parent watchdog that
kills an audit above --cap-gib), evaluations (sample forward passes under noise, `runtime.evaluations`; for a
per-token output sequences, not the tokens the report counts), the cost ratio = wall time / (evaluations x one clean
pass of one image by a plain session), and the plain session's peak RSS and time per pass of the same images. The
naive method that reruns the whole model per evaluation has ratio 1.0 (plus its own overheads); running only the
suffixes averages about 0.5 on a chain of equal layers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: name -> (library, constructor, exporter, input size: image side, or tokens per sequence for "hf"/"hf-lm")
#: ("hf": a sequence classifier, `<ctor>ForSequenceClassification`; "hf-lm": a causal language model,
#: `AutoModelForCausalLM`, whose output is the per-token logits [N, T, vocabulary])
MODELS = {
    "resnet18": ("torchvision", "resnet18", "legacy", 224),
    "resnet50": ("torchvision", "resnet50", "legacy", 224),
    "vit_b_16": ("torchvision", "vit_b_16", "legacy", 224),
    "mobilenet_v3_large": ("torchvision", "mobilenet_v3_large", "legacy", 224),
    "efficientnet_b0": ("torchvision", "efficientnet_b0", "legacy", 224),
    "resnet18_dynamo": ("torchvision", "resnet18", "dynamo", 224),
    # `.half()` after the BatchNorm statistics: weights, activations, input and logits in float16
    "resnet18_fp16": ("torchvision", "resnet18", "legacy-half", 224),
    "deit_tiny": ("timm", "deit_tiny_patch16_224", "legacy", 224),
    "bert_cls": ("hf", "Bert", "legacy", 32),
    "gpt2_cls": ("hf", "GPT2", "legacy", 32),
    "convnext_tiny": ("torchvision", "convnext_tiny", "legacy", 224),
    # timm's default input for MobileViT is 256 (at 224 its 2x2 patches need an interpolation in every block)
    "mobilevit_xxs_dynamo": ("timm", "mobilevit_xxs", "dynamo", 256),
    "distilbert_cls": ("hf", "DistilBert", "legacy", 32),
    "gpt2_lm": ("hf-lm", "GPT2", "legacy", 32),
}
#: name -> the float model it quantizes (INT8 QDQ, static, per-channel, calibrated on the zoo's images; `zoo.py
#: quantize` in walkaudit's venv, after `build`)
QUANTIZED = {"resnet18_qdq": "resnet18", "mobilenet_v3_large_qdq": "mobilenet_v3_large"}
#: every k-th site is audited (evenly spread, so the cost ratio stays representative) where a full audit takes hours on
#: two shared cores; 1: all sites
EVERY = {"resnet18": 1, "resnet50": 3, "vit_b_16": 12, "mobilenet_v3_large": 4, "efficientnet_b0": 5,
         "resnet18_dynamo": 1, "resnet18_qdq": 1, "resnet18_fp16": 1, "deit_tiny": 4, "bert_cls": 6, "gpt2_cls": 6,
         "convnext_tiny": 5, "mobilevit_xxs_dynamo": 1, "distilbert_cls": 1, "gpt2_lm": 3,
         "mobilenet_v3_large_qdq": 1}
#: Hugging Face sequence classifiers: labels (more than 2, so that random weights spread the predictions)
HF_LABELS = 8
#: Hugging Face language models: the vocabulary of their config (small, so that the logits [N, T, vocabulary] stay
#: small; the audit scores every token against the clean model's prediction among them)
LM_VOCAB = 512
OPSET, DYNAMO_OPSET, MAX_IR_VERSION = 17, 18, 10


# -- build (torch) ---------------------------------------------------------------------------------------------------
def images(n: int, size: int, seed: int):
    """Smooth random images (low-frequency fields plus a little pixel noise), roughly ImageNet-normalised."""
    import numpy as np

    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(n, 3, 7, 7)).astype(np.float32)
    up = np.kron(coarse, np.ones((1, 1, size // 7 + 1, size // 7 + 1), np.float32))[:, :, :size, :size]
    return (up + 0.3 * rng.normal(size=up.shape)).astype(np.float32)


def tokens(n: int, length: int, vocab: int, seed: int):
    """Random token ids, 1000 (an eighth of a small vocabulary) away from either end: no pad/eos/special token."""
    import numpy as np

    margin = min(1000, vocab // 8)
    return np.random.default_rng(seed).integers(margin, vocab - margin, size=(n, length), dtype=np.int64)


def construct(library: str, ctor: str):
    """A model with random weights from its library's constructor (nothing downloaded) and an input maker."""
    import torch

    if library == "torchvision":
        import torchvision

        return getattr(torchvision.models, ctor)(weights=None), images
    if library == "timm":
        import timm

        return timm.create_model(ctor, pretrained=False), images
    import transformers

    if library == "hf-lm":
        # eos/bos at the end of the small vocabulary (GPT-2's 50256 would be no token of it); the model is made with
        # its constructor from the config (random weights), `AutoModelForCausalLM` picks GPT2LMHeadModel for GPT-2
        config = getattr(transformers, f"{ctor}Config")(vocab_size=LM_VOCAB, bos_token_id=LM_VOCAB - 1,
                                                         eos_token_id=LM_VOCAB - 1)
        config.use_cache = False

        class TokenLogits(torch.nn.Module):  # the logits [N, T, vocabulary], not the model's output dataclass
            def __init__(self):
                super().__init__()
                self.model = transformers.AutoModelForCausalLM.from_config(config)

            def forward(self, input_ids):
                # an all-ones mask: without one transformers looks for packed sequences with aten::diff, which the
                # legacy exporter lacks (as for gpt2_cls)
                return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits

        return TokenLogits(), lambda n, length, seed: tokens(n, length, config.vocab_size, seed)

    config = getattr(transformers, f"{ctor}Config")(num_labels=HF_LABELS)
    if config.pad_token_id is None:  # GPT-2 finds each sequence's last token by its padding id
        config.pad_token_id = config.eos_token_id
    config.use_cache = False

    class Logits(torch.nn.Module):  # the export's one output: the logits, not the model's output dataclass
        def __init__(self):
            super().__init__()
            self.model = getattr(transformers, f"{ctor}ForSequenceClassification")(config)

        def forward(self, input_ids):
            if ctor != "GPT2":
                return self.model(input_ids=input_ids).logits
            # GPT-2 scores each sequence's last non-pad token, found with aten::diff, which the legacy exporter lacks;
            # the sequences have no padding: the last token. An all-ones mask, else transformers looks for packed
            # sequences with aten::diff too
            hidden = self.model.transformer(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
            return self.model.score(hidden.last_hidden_state[:, -1])

    def make(n: int, length: int, seed: int):
        return tokens(n, length, config.vocab_size, seed)

    return Logits(), make


def build(out: Path, names: list[str], samples: int, stats_samples: int) -> None:
    import warnings

    import numpy as np
    import onnx
    import torch

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name in QUANTIZED:
            print(f"{name}: made by `zoo.py quantize` in walkaudit's venv", flush=True)
            continue
        library, ctor, exporter, size = MODELS[name]
        path = out / f"{name}.onnx"
        torch.manual_seed(0)
        model, make = construct(library, ctor)
        half = exporter.endswith("-half")
        x = make(samples, size, seed=1)
        np.save(out / f"{name}_x.npy", x.astype(np.float16) if half else x)
        if path.exists():
            print(f"{name}: {path} exists", flush=True)
            continue
        t = time.perf_counter()
        for m in model.modules():  # ViT's (and timm's) head starts at zero: every image would score alike
            if isinstance(m, torch.nn.Linear) and not m.weight.detach().any():
                torch.nn.init.normal_(m.weight, std=0.02)
        # BatchNorm statistics of the data (cumulative average over the batches): with random weights and the
        # default running statistics every image lands in the same class
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            # timm zero-initialises the last BatchNorm of every residual branch (`zero_init_last`): each branch would
            # be 0, and noise anywhere inside it multiplied by 0 (those sites censored "above" at any σ)
            if m.affine and not m.weight.detach().any():
                torch.nn.init.ones_(m.weight)
        if norms:
            model.train()
            calib = make(stats_samples, size, seed=2)
            with torch.no_grad():
                for i in range(0, len(calib), 8):
                    model(torch.from_numpy(calib[i : i + 8]))
        model.eval()
        if half:
            model = model.half()
        example = (torch.from_numpy(x[:2]).half() if half else torch.from_numpy(x[:2]),)
        inp = "input_ids" if library.startswith("hf") else "x"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                torch.onnx.export(model, example, str(path), dynamo=True, external_data=False,
                                  opset_version=DYNAMO_OPSET, input_names=[inp], output_names=["logits"],
                                  dynamic_shapes={inp: {0: torch.export.Dim("batch")}})
            else:
                torch.onnx.export(model, example, str(path), dynamo=False, opset_version=OPSET, input_names=[inp],
                                  output_names=["logits"], dynamic_axes={inp: {0: "batch"}, "logits": {0: "batch"}})
        proto = onnx.load(str(path))
        proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
        onnx.save(proto, str(path))
        with torch.no_grad():
            logits = model(example[0].new_tensor(x) if half else torch.from_numpy(x))
            classes = (logits[0] if isinstance(logits, tuple) else logits).argmax(-1)
        # per-token logits: how many distinct tokens are predicted over all positions
        seen = (f"classes of the {samples} inputs: {classes.tolist()}" if classes.ndim == 1 else
                f"{len(classes.unique())} distinct tokens predicted at the {classes.numel()} positions")
        print(f"{name}: {path.stat().st_size / 2**20:.0f} MB, {time.perf_counter() - t:.0f} s, {seen}", flush=True)


def quantize(zoo: Path, names: list[str], calib_samples: int) -> None:
    """INT8 QDQ (static, per-channel, QUInt8 activations, QInt8 weights) of the float models, calibrated on the zoo's
    images (the same smooth random fields as the BatchNorm statistics); onnxruntime's pre-processing first."""
    import shutil

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    for name in names:
        source = QUANTIZED[name]
        size = MODELS[source][3]
        path, pre = zoo / f"{name}.onnx", zoo / f"{name}_pre.onnx"
        shutil.copyfile(zoo / f"{source}_x.npy", zoo / f"{name}_x.npy")
        if path.exists():
            print(f"{name}: {path} exists", flush=True)
            continue
        t = time.perf_counter()
        quant_pre_process(str(zoo / f"{source}.onnx"), str(pre), skip_symbolic_shape=True)  # no sympy here
        calib = images(calib_samples, size, seed=2)

        class Reader(CalibrationDataReader):
            def __init__(self, calib):
                self.batches = iter([{"x": calib[i : i + 8]} for i in range(0, len(calib), 8)])

            def get_next(self):
                return next(self.batches, None)

        tmp = zoo / f"{name}.tmp.onnx"
        quantize_static(str(pre), str(tmp), Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        os.replace(tmp, path)
        pre.unlink()
        print(f"{name}: {path.stat().st_size / 2**20:.0f} MB, {time.perf_counter() - t:.0f} s", flush=True)


# -- measure (onnxruntime, walkaudit) ---------------------------------------------------------------------------------
def _status(pid: int | str, key: str) -> float:
    """A /proc/PID/status field in MiB (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def plain(model: str, data: str, threads: int, passes: int) -> dict:
    """A plain onnxruntime session of the model (default options) over the images: its peak and time per pass."""
    import numpy as np
    import onnxruntime as ort

    x = np.load(data)
    before = _status("self", "VmRSS")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    t = time.perf_counter()
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    created = time.perf_counter() - t
    name = session.get_inputs()[0].name
    times, cpu = [], []
    for _ in range(passes):
        t, c = time.perf_counter(), time.process_time()
        session.run(None, {name: x})
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"rss_before_mib": before, "peak_mib": _status("self", "VmHWM"), "session_s": created,
            "pass_s": float(np.median(times)), "pass_cpu_s": float(np.median(cpu)), "passes": passes,
            "images": len(x)}


def audit(model: str, data: str, threads: int, every: int, keep: str | None = None) -> dict:
    """One walkaudit audit (library call, batch = the images; every `every`-th site), its peak and what it did; the
    report written to `keep` when given."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    import walkaudit
    from walkaudit._graph.sites import Selection, select
    from walkaudit._loading.model import load_model

    x = np.load(data)
    before = _status("self", "VmRSS")
    t, c = time.perf_counter(), time.process_time()
    options = {}
    if every > 1:
        loaded = load_model(model, None)
        names = [s.name for s in select(loaded.proto, loaded.types, Selection(), loaded.class_output.name)]
        options["selection"] = Selection(names=tuple(names[::every]))
        del loaded
    report = walkaudit.audit(model, x, None, threads=threads, provider="cpu", batch_size=len(x), **options)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    if keep:
        Path(keep).write_text(report.to_json())
    body = report.to_dict()
    runtime, scored = body["runtime"], body["data"].get("scored_tokens")
    evaluations = runtime.get("evaluations")
    # a per-token output counts scored tokens: the evaluations of whole sequences are a `samples / scored` share
    tokens = {"token_evaluations": evaluations, "scored_tokens": scored} if scored else {}
    if scored:
        evaluations = round(evaluations * body["data"]["samples"] / scored)
    return {"rss_before_mib": before, "peak_mib": _status("self", "VmHWM"), "wall_s": wall, "cpu_s": cpu,
            "sites": len(report.sites), "every": every, "evaluations": evaluations, **tokens,
            "clean_accuracy": report.clean_accuracy, "cache_budget_bytes": runtime.get("cache_budget_bytes"),
            "censored": sum(1 for s in report.sites if s.censored)}


def deployed(zoo: Path, names: list[str]) -> None:
    """The quantized models audited as deployed: with the labels a plain onnxruntime session of the model predicts,
    walkaudit's clean accuracy and every site's accuracy at σ = 0 are 1.0 when its clean pass and its suffixes run
    what the deployed model runs (every site, σ = 0 and 1e-4, one repeat: the clean pass is the point)."""
    import numpy as np
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT))
    import walkaudit

    for name in names:
        model, x = str(zoo / f"{name}.onnx"), np.load(zoo / f"{name}_x.npy")
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        y = session.run(None, {session.get_inputs()[0].name: x})[0].argmax(-1)
        del session
        report = walkaudit.audit(model, x, y, threads=2, provider="cpu", batch_size=len(x),
                                 sigmas=(0.0, 1e-4), repeats=1)
        lowest = {level: min(p.accuracy for s in report.sites for p in s.points if p.sigma == level)
                  for level in (0.0, 1e-4)}
        print(json.dumps({"model": name, "deployed_predictions": y.tolist(), "clean_accuracy": report.clean_accuracy,
                          "sites": len(report.sites), "lowest_site_accuracy": {"0": lowest[0.0], "1e-4": lowest[1e-4]},
                          "first_sites": [s.name for s in report.sites[:2]]}), flush=True)


def child(kind: str, model: Path, data: Path, threads: int, cap_mib: float, extra: list[str]) -> dict:
    """Run `kind` (plain or audit) in a child process; poll its RSS and kill it above `cap_mib`."""
    cmd = [sys.executable, __file__, kind, str(model), str(data), "--threads", str(threads), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, t = 0.0, time.perf_counter()
    while proc.poll() is None:
        try:
            rss = _status(proc.pid, "VmRSS")
        except (FileNotFoundError, ProcessLookupError):
            break
        peak = max(peak, rss)
        if rss > cap_mib:
            proc.kill()
            proc.wait()
            return {"killed": f"RSS {rss:.0f} MiB above the cap after {time.perf_counter() - t:.0f} s"}
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode:
        return {"failed": (err.strip().splitlines() or ["?"])[-1][:300]}
    result = json.loads(out.strip().splitlines()[-1])
    result["polled_peak_mib"] = peak
    return result


def run(zoo: Path, names: list[str], threads: int, cap_gib: float, passes: int, every: int | None, out: str | None,
        reports: Path | None = None):
    rows = []
    if reports:
        reports.mkdir(parents=True, exist_ok=True)
    for name in names:
        model, data = zoo / f"{name}.onnx", zoo / f"{name}_x.npy"
        if not model.exists():
            print(f"{name}: not built", flush=True)
            continue
        base = child("plain", model, data, threads, cap_gib * 1024, ["--passes", str(passes)])
        stride = EVERY.get(name, 1) if every is None else every
        keep = ["--report", str(reports / f"{name}.json")] if reports else []
        result = child("audit", model, data, threads, cap_gib * 1024, ["--every", str(stride), *keep])
        row = {"model": name, "size_mb": model.stat().st_size / 2**20, "plain": base, "audit": result}
        after = child("plain", model, data, threads, cap_gib * 1024, ["--passes", str(passes)])
        row["plain_after"] = after
        if "wall_s" in result and "pass_s" in base and "pass_s" in after:
            # the load of a shared machine moves from minute to minute: the plain pass before and after the audit
            per_image = (base["pass_s"] + after["pass_s"]) / 2 / base["images"]
            row["ratio"] = result["wall_s"] / (result["evaluations"] * per_image)
            per_image_cpu = (base["pass_cpu_s"] + after["pass_cpu_s"]) / 2 / base["images"]
            row["cpu_ratio"] = result["cpu_s"] / (result["evaluations"] * per_image_cpu)
            row["clean_passes"] = result["evaluations"] / base["images"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print("| model | MB | sites audited | wall s | evaluations | ratio (wall) | ratio (CPU) | audit peak MiB | "
          "plain peak MiB | plain pass s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, p = r["audit"], r["plain"]
        what = a.get("killed") or a.get("failed")
        if what:
            print(f"| {r['model']} | {r['size_mb']:.0f} | | {what} | | | | | {p.get('peak_mib', 0):.0f} | |")
            continue
        nan = float("nan")
        print(f"| {r['model']} | {r['size_mb']:.0f} | {a['sites']} (every {a['every']}) | {a['wall_s']:.0f} | "
              f"{a['evaluations']} | {r.get('ratio', nan):.2f} | {r.get('cpu_ratio', nan):.2f} | {a['peak_mib']:.0f} | "
              f"{p['peak_mib']:.0f} | {p['pass_s']:.3f} |")
    if out:
        Path(out).write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="export the models (needs torch and torchvision)")
    b.add_argument("--out", type=Path, default=Path("/work/zoo"))
    b.add_argument("--models", nargs="*", default=list(MODELS))
    b.add_argument("--images", type=int, default=8)
    b.add_argument("--stats-images", type=int, default=64)
    r = sub.add_parser("run", help="audit each model in a child process, beside a plain session")
    r.add_argument("--zoo", type=Path, default=Path("/work/zoo"))
    r.add_argument("--models", nargs="*", default=[*MODELS, *QUANTIZED])
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--cap-gib", type=float, default=10.0)
    r.add_argument("--passes", type=int, default=7)
    r.add_argument("--every", type=int, help="audit every k-th site (default: per model, EVERY)")
    r.add_argument("--json")
    r.add_argument("--reports", type=Path, help="write each audit's report (walkaudit JSON) to this folder")
    for kind in ("plain", "audit"):
        c = sub.add_parser(kind, help="(internal) one measurement, one JSON line")
        c.add_argument("model")
        c.add_argument("data")
        c.add_argument("--threads", type=int, default=2)
        c.add_argument("--passes", type=int, default=7)
        c.add_argument("--every", type=int, default=1)
        c.add_argument("--report")
    q = sub.add_parser("quantize", help="INT8 QDQ of the built float models (walkaudit's venv, onnxruntime)")
    q.add_argument("--zoo", type=Path, default=Path("/work/zoo"))
    q.add_argument("--models", nargs="*", default=list(QUANTIZED))
    q.add_argument("--calib-images", type=int, default=64)
    d = sub.add_parser("deployed", help="clean accuracy against a plain session's predictions (quantized models)")
    d.add_argument("--zoo", type=Path, default=Path("/work/zoo"))
    d.add_argument("--models", nargs="*", default=list(QUANTIZED))
    args = parser.parse_args()
    if args.command == "build":
        build(args.out, [m for m in args.models if m not in QUANTIZED], args.images, args.stats_images)
    elif args.command == "quantize":
        quantize(args.zoo, args.models, args.calib_images)
    elif args.command == "deployed":
        deployed(args.zoo, args.models)
    elif args.command == "run":
        run(args.zoo, args.models, args.threads, args.cap_gib, args.passes, args.every, args.json, args.reports)
    elif args.command == "plain":
        print(json.dumps(plain(args.model, args.data, args.threads, args.passes)))
    else:
        print(json.dumps(audit(args.model, args.data, args.threads, args.every, args.report)))


if __name__ == "__main__":
    main()
