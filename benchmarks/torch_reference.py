"""The paper's method in PyTorch: a noise hook after one layer at a time, one full forward pass per (site, σ, repeat).

This is how the Walking Noise code measures a walk: the network carries a noise module after each layer output
(here a forward hook on the Conv/Linear module, so the noise lands on the output *with its bias*, BN already folded);
only one of them is switched on; every (σ, repeat) point is a full pass over the evaluation set from the input,
batched over samples. Additive noise: y' = y + σ·ε with ε = torch.randn_like(y) drawn anew per pass.
"""

from __future__ import annotations

import time

import numpy as np
import torch


class AdditiveNoise:
    """A forward hook adding σ·N(0, 1) to a module's output; σ = 0 leaves the output untouched."""

    def __init__(self):
        self.sigma = 0.0

    def __call__(self, module, inputs, output):
        if self.sigma == 0.0:
            return output
        return output + self.sigma * torch.randn_like(output)


def walk(model: torch.nn.Module, modules: list[torch.nn.Module], x: np.ndarray, y: np.ndarray | None, sigmas,
         repeats: int, batch: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """Accuracy [sites, levels, repeats], clean predictions, seconds. Targets are `y`, or the clean predictions.

    The clean pass (needed for agreement targets) is inside the timed region, as walkaudit's is.
    """
    torch.manual_seed(seed)
    model.eval()
    started = time.perf_counter()
    with torch.inference_mode():
        xs = [torch.from_numpy(x[i : i + batch]) for i in range(0, len(x), batch)]
        clean = torch.cat([model(xb).argmax(1) for xb in xs])
        target = clean if y is None else torch.from_numpy(y)
        targets = [target[i : i + batch] for i in range(0, len(x), batch)]
        acc = np.zeros((len(modules), len(sigmas), repeats))
        for s, module in enumerate(modules):
            hook = AdditiveNoise()
            handle = module.register_forward_hook(hook)
            try:
                for li, sigma in enumerate(sigmas):
                    hook.sigma = float(sigma)
                    for r in range(repeats):
                        correct = 0
                        for xb, tb in zip(xs, targets):
                            correct += int((model(xb).argmax(1) == tb).sum())
                        acc[s, li, r] = correct / len(x)
            finally:
                handle.remove()
    return acc, clean.numpy(), time.perf_counter() - started


def global_walk(model: torch.nn.Module, modules: list[torch.nn.Module], x: np.ndarray, y: np.ndarray | None, sigmas,
                repeats: int, batch: int = 1000, seed: int = 0) -> tuple[np.ndarray, float]:
    """Global mode: the same σ at every hooked module at once, one full forward pass per (σ, repeat).
    Accuracy [levels, repeats] and seconds (the clean pass for the targets included)."""
    torch.manual_seed(seed)
    model.eval()
    started = time.perf_counter()
    hooks = [AdditiveNoise() for _ in modules]
    handles = [m.register_forward_hook(h) for m, h in zip(modules, hooks)]
    try:
        with torch.inference_mode():
            xs = [torch.from_numpy(x[i : i + batch]) for i in range(0, len(x), batch)]
            clean = torch.cat([model(xb).argmax(1) for xb in xs])
            target = clean if y is None else torch.from_numpy(y)
            targets = [target[i : i + batch] for i in range(0, len(x), batch)]
            acc = np.zeros((len(sigmas), repeats))
            for li, sigma in enumerate(sigmas):
                for h in hooks:
                    h.sigma = float(sigma)
                for r in range(repeats):
                    correct = 0
                    for xb, tb in zip(xs, targets):
                        correct += int((model(xb).argmax(1) == tb).sum())
                    acc[li, r] = correct / len(x)
    finally:
        for handle in handles:
            handle.remove()
    return acc, time.perf_counter() - started
