"""The benchmark networks: a LeNet-5 on real digits and a ResNet-8 on synthetic 3x32x32 images.

Both are built and briefly trained in torch, BatchNorm is folded into the convolutions *in torch* (so the torch
reference hooks the very tensors walkaudit's default sites are: every Conv/Gemm output, bias included), and the folded
network is exported with the legacy exporter (opset 17, dynamic batch, IR version lowered to 10 for onnxruntime 1.31).

Everything is seeded; a build takes a few seconds on 2 CPU cores.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

OPSET = 17
MAX_IR_VERSION = 10


@dataclass
class Bench:
    """One benchmark network: the folded torch model, its ONNX export, the data and the hook sites."""

    name: str
    torch_model: nn.Module  # BN folded, eval mode; produces the same logits as the ONNX model
    onnx_path: Path
    x: np.ndarray  # evaluation inputs, float32 [N, C, H, W]
    y: np.ndarray | None  # labels, or None: agreement with the clean model's predictions (both methods)
    sites: list[str]  # module names (torch) of the Conv/Linear layers, in graph order
    train_accuracy: float = float("nan")

    def site_modules(self) -> list[nn.Module]:
        mods = dict(self.torch_model.named_modules())
        return [mods[n] for n in self.sites]


# -- networks ------------------------------------------------------------------------------------------------------
class LeNet5(nn.Module):
    """The classic LeNet-5 (1x32x32 input, ReLU, max pooling): 2 Conv + 3 Linear = 5 sites."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class Block(nn.Module):
    """ResNet basic block: conv-bn-relu-conv-bn + shortcut (1x1 conv-bn when the shape changes), relu."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.short is None else self.short(x)))


class ResNet8(nn.Module):
    """ResNet-8 for 3x32x32: stem conv + 3 stages of one basic block (widths w, 2w, 4w) + Linear.
    10 sites after folding: stem, 2 convs per block, 2 shortcut convs, fc."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        w = width
        self.stem = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(w)
        self.layer1 = Block(w, w, 1)
        self.layer2 = Block(w, 2 * w, 2)
        self.layer3 = Block(2 * w, 4 * w, 2)
        self.fc = nn.Linear(4 * w, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every Conv2d followed by a BatchNorm2d into the Conv2d (eval mode); the BN becomes Identity."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    pairs = [("stem", "bn"), ("layer1.conv1", "layer1.bn1"), ("layer1.conv2", "layer1.bn2")]
    for layer in ("layer2", "layer3"):
        pairs += [(f"{layer}.conv1", f"{layer}.bn1"), (f"{layer}.conv2", f"{layer}.bn2"),
                  (f"{layer}.short.0", f"{layer}.short.1")]
    mods = dict(model.named_modules())
    for conv, bn in pairs:
        if conv not in mods:
            continue
        fused = fuse_conv_bn_eval(mods[conv], mods[bn])
        _set(model, conv, fused)
        _set(model, bn, nn.Identity())
    return model


def _set(model: nn.Module, dotted: str, value: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, value)


# -- data ----------------------------------------------------------------------------------------------------------
def digits_32(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 real 8x8 digits, upsampled to 1x32x32 (nearest, 4x), standardised; shuffled."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0
    x = np.kron(x, np.ones((4, 4), np.float32))[:, None]  # [N, 1, 32, 32]
    x = (x - x.mean()) / x.std()
    order = np.random.default_rng(seed).permutation(len(x))
    return np.ascontiguousarray(x[order]), d.target[order].astype(np.int64)


def synthetic_images(n: int, seed: int = 0, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """3x32x32 images: a smooth class template (fixed per class), random gain and shift, pixel noise."""
    rng = np.random.default_rng(1234)  # templates do not depend on the sample seed
    coarse = rng.normal(0, 1, (classes, 3, 4, 4)).astype(np.float32)
    templates = F.interpolate(torch.from_numpy(coarse), size=(32, 32), mode="bicubic", align_corners=False).numpy()
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    gain = rng.uniform(0.6, 1.4, (n, 1, 1, 1)).astype(np.float32)
    x = templates[y] * gain
    shifts = rng.integers(-3, 4, (n, 2))
    for i, (dy, dx) in enumerate(shifts):
        x[i] = np.roll(x[i], (int(dy), int(dx)), axis=(1, 2))
    x += rng.normal(0, 1.5, x.shape).astype(np.float32)
    return np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64)


# -- training and export -------------------------------------------------------------------------------------------
def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float = 2e-3, batch: int = 64,
          seed: int = 0) -> float:
    """A brief Adam training; returns the training accuracy at the end."""
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.inference_mode():
        return float((model(xt).argmax(1) == yt).float().mean())


def export(model: nn.Module, path: Path, example: np.ndarray) -> Path:
    """Legacy exporter, opset 17, dynamic batch, IR version ≤ 10, one file."""
    import onnx

    model.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(example[:2]),), buf, dynamo=False, opset_version=OPSET,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def check_same(bench: Bench) -> float:
    """Max |torch − onnxruntime| of the logits on a few samples (they must be the same network)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bench.onnx_path), providers=["CPUExecutionProvider"])
    x = bench.x[:64]
    with torch.inference_mode():
        ref = bench.torch_model(torch.from_numpy(x)).numpy()
    got = sess.run(None, {"x": x})[0]
    return float(np.abs(ref - got).max())


def lenet5(folder: Path, samples: int | None = None) -> Bench:
    """LeNet-5 trained 4 epochs on the 1797 digits; evaluated on (up to) all of them, with the real labels."""
    torch.manual_seed(0)
    x, y = digits_32()
    model = LeNet5()
    acc = train(model, x, y, epochs=4)
    n = len(x) if samples is None else min(samples, len(x))
    path = export(model, Path(folder) / "lenet5.onnx", x)
    return Bench("LeNet-5", model, path, x[:n], y[:n], ["conv1", "conv2", "fc1", "fc2", "fc3"], acc)


def resnet8(folder: Path, samples: int = 1000, width: int = 16) -> Bench:
    """ResNet-8 trained one epoch on 2000 synthetic images; evaluated on `samples` fresh ones in agreement mode
    (target = the clean model's prediction)."""
    torch.manual_seed(0)
    xtr, ytr = synthetic_images(2000, seed=1)
    model = ResNet8(width)
    acc = train(model, xtr, ytr, epochs=1)
    fold_batchnorm(model)
    x, _ = synthetic_images(samples, seed=2)
    path = export(model, Path(folder) / "resnet8.onnx", x)
    sites = ["stem", "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2", "layer2.short.0",
             "layer3.conv1", "layer3.conv2", "layer3.short.0", "fc"]
    return Bench("ResNet-8", model, path, x, None, sites, acc)
