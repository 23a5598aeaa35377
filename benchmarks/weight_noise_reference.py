"""A layer's weight-noise curve from a PyTorch reference that perturbs the same weights (issue 23, item 5).

The MLP of samples/mnist_mlp.dynamo.onnx is rebuilt in torch from the ONNX file's own initializers (Flatten, then
Linear layers net.1, net.3, net.5 with ReLUs, as samples/make.py trained it). For each Linear layer, each σ of a
grid and each repeat, the layer's weight is replaced by

    weight-additive        W' = W + σ·ε
    weight-multiplicative  W' = W·(1 + σ·ε)

with ε = torch.randn_like(W) drawn once per repeat from torch's own generator (one programmed chip per repeat, every
sample read through it), and the whole validation set runs through the model; accuracy against the labels. The
script writes benchmarks/weight_noise_reference.json: the grid, the correct counts per (layer, σ, repeat), the clean
accuracy, torch's version and the seed. tests/test_weight_noise.py fits those stored curves with walkaudit's fit and
checks that walkaudit's own audit of the same weights (its own draws, its suffix-only evaluation) finds the same
midpoints. torch is never a dependency of walkaudit or of its test suite.

    python -m venv /work/nvenv && /work/nvenv/bin/pip install torch==2.13.0 numpy onnx
    /work/nvenv/bin/python benchmarks/weight_noise_reference.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("net.1", "net.3", "net.5")
KINDS = ("weight-additive", "weight-multiplicative")


class MLP(torch.nn.Module):
    """samples/make.py's MNIST MLP: `net` = Flatten, Linear 784→128, ReLU, Linear 128→64, ReLU, Linear 64→10."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 128), torch.nn.ReLU(),
                                       torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


def rebuilt(path: Path) -> MLP:
    """The sample MLP in torch, with the ONNX file's weights (its initializers keep torch's state-dict names)."""
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in onnx.load(path).graph.initializer}
    model = MLP()
    model.load_state_dict({k: v for k, v in weights.items() if k.startswith("net.")})
    return model.eval()


def perturbed(w: torch.Tensor, kind: str, sigma: float, eps: torch.Tensor) -> torch.Tensor:
    return w + sigma * eps if kind == "weight-additive" else w * (1 + sigma * eps)


def curves(model: MLP, x: torch.Tensor, y: torch.Tensor, grid: dict[str, list[float]],
           repeats: int, seed: int) -> dict:
    torch.manual_seed(seed)
    out = {}
    with torch.inference_mode():
        for kind in KINDS:
            out[kind] = {}
            for layer in LAYERS:
                module = model.get_submodule(layer)
                clean = module.weight.detach().clone()
                correct = np.zeros((len(grid[kind]), repeats), np.int64)
                for r in range(repeats):
                    eps = torch.randn_like(clean)  # one chip per repeat, read at every level
                    for level, sigma in enumerate(grid[kind]):
                        module.weight.copy_(perturbed(clean, kind, sigma, eps))
                        correct[level, r] = int((model(x).argmax(1) == y).sum())
                module.weight.copy_(clean)
                out[kind][f"{layer}.weight"] = correct.tolist()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "weight_noise_reference.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_path = ROOT / "samples" / "mnist_mlp.dynamo.onnx"
    data = np.load(ROOT / "samples" / "mnist_val.npz")
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    model = rebuilt(model_path)
    with torch.inference_mode():
        clean = int((model(x).argmax(1) == y).sum())
    grid = {"weight-additive": np.logspace(-2, 0.5, 21).round(6).tolist(),
            "weight-multiplicative": np.logspace(-1, 1.5, 21).round(6).tolist()}
    started = time.perf_counter()
    body = {"model": "samples/mnist_mlp.dynamo.onnx", "data": "samples/mnist_val.npz", "samples": len(y),
            "clean_correct": clean, "chance": 0.1, "repeats": args.repeats, "seed": args.seed,
            "torch": torch.__version__, "grid": grid,
            "correct": curves(model, x, y, grid, args.repeats, args.seed)}
    body["seconds"] = round(time.perf_counter() - started, 2)
    args.out.write_text(json.dumps(body, indent=1) + "\n")
    print(f"wrote {args.out} ({body['seconds']} s, torch {torch.__version__}, clean {clean}/{len(y)})")


if __name__ == "__main__":
    main()
