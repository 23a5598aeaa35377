"""How a unit's noisy graph runs: one class per evaluation path, chosen in one function (`choose`).

Every strategy runs one batch of clean values for G σ levels at once (when the graph takes G tiled copies of the
batch; else the caller passes one level at a time) and returns the class output [G·N, ...]:

- `FedSuffix`: a walk site's suffix applies the noise itself from host-drawn ε (`passes.graph_noise(fed=True)`), run
  through IOBinding with the clean values kept on the device. The default, any opset from 10.
- `DrawnSuffix`: the same suffix drawing ε in the graph (RandomNormalLike, opsets 10–21): ε never leaves the device,
  but it is drawn anew per run, so it is reproducible only for the same batches in the same order.
- `HostApplied`: the suffix fed y' computed on the host (`NoiseModel.host`): opsets before 10, sites of unknown rank,
  and models without graph nodes (quantize, bit flips).
- `WeightSuffix`: a weight site's suffix fed the weight perturbed on the host, level by level (weight noise).
- `FedGlobal`: the whole model with noise after every site from fed ε (`passes.inject_fed`), global mode.
- `TermsGlobal`: the whole model with Mul/Add nodes whose factors the host computes (`passes.inject`), global mode
  on opsets before 10 or sites that are not float32 of known rank.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import onnx

from walkaudit._execution.runtime import Runtime, run, run_bound
from walkaudit._graph import passes
from walkaudit._loading.model import LoadedModel
from walkaudit._noise import NoiseModel
from walkaudit._noise.base import Affine
from walkaudit._noise.registry import global_models
from walkaudit.errors import UsageError


def choose(mode: str, opset: int, sites: list, provider: str | None, noise_source: str,
           noise: NoiseModel | None = None) -> type[Strategy]:
    """The evaluation path for a unit. `sites`: the TensorSpecs of its noisy sites; `noise`: a model of weights runs
    `WeightSuffix`; a model without graph nodes (`NoiseModel.graph_applies` False: quantize, bit flips) the host
    path."""
    if noise is not None and noise.walk_only:
        if mode == "global":
            raise UsageError(f"{noise.kind} noise walks one site at a time; global mode takes "
                             f"{', '.join(global_models())} noise")
        return WeightSuffix if noise.target == "weights" else HostApplied
    if mode == "global":
        fed = opset >= passes.FED_NOISE_MIN_OPSET and all(
            s.elem_type == onnx.TensorProto.FLOAT and s.shape is not None for s in sites)
        return FedGlobal if fed else TermsGlobal
    if graph_draws(opset, provider, noise_source, noise):
        return DrawnSuffix
    if opset < passes.FED_NOISE_MIN_OPSET or sites[0].shape is None:
        return HostApplied
    return FedSuffix


#: where ε is drawn (`--noise-source`): auto (the graph on CUDA), host (numpy, fed in), graph (RandomNormalLike)
NOISE_SOURCES = ("auto", "host", "graph")


def graph_draws(opset: int, provider: str | None, noise_source: str, noise: NoiseModel | None = None) -> bool:
    """ε drawn in the graph where it pays (on CUDA, where the opset has random ops), or where asked for; never for a
    model the graph cannot draw (`NoiseModel.graph_draw`)."""
    if noise is not None and noise.graph_draw is None:
        return False
    if noise_source == "auto":
        return provider == "CUDAExecutionProvider" and opset in passes.GRAPH_NOISE_OPSETS
    return noise_source == "graph"


class Strategy(ABC):
    """One way to run a unit's noisy graph over a batch of clean values."""

    reads: tuple[str, ...]  # clean values fed per batch, untiled [N, ...]
    noisy: tuple[str, ...]  # sites whose ε the host draws, [draws, 1, N, ...] each; () when the graph draws it
    on_device: tuple[str, ...] = ()  # reads the caller keeps on the device (OrtValues) between runs
    frontier: tuple[str, ...] = ()  # reads a suffix copies for every σ level it packs (global mode: none counted)
    graph: onnx.ModelProto  # the clean graph it runs (its bytes per row size the runs)
    packs: bool = True  # G levels can share a run (False: a level changes the weights)
    weights: Mapping[str, tuple[int, ...]] = MappingProxyType({})  # weight sites (shapes) the worker draws per repeat

    @abstractmethod
    def run(self, values: dict[str, np.ndarray], sigmas: np.ndarray, eps: dict[str, np.ndarray],
            device: dict | None = None) -> np.ndarray:
        """The class output for the G levels of `sigmas` [G·N, ...]."""

    def one_level(self) -> Strategy:
        """This strategy for runs of one σ level (itself, unless a cheaper graph serves them)."""
        return self


def _affine(noise: NoiseModel) -> Affine:
    """The noise model of a path whose graph applies the noise (σ scales, `Affine.factors`). `choose` picks such a
    path only for models with graph nodes (`NoiseModel.graph_applies`), which are the affine ones."""
    if not isinstance(noise, Affine):
        raise TypeError(f"{noise.kind} noise has no graph nodes: it runs on the host (HostApplied), walk mode only")
    return noise


def _tile(a: np.ndarray, times: int) -> np.ndarray:
    return a if times == 1 else np.concatenate([a] * times)


class HostApplied(Strategy):
    """The suffix fed y' for every level, computed by the noise model on the host, and the frontier tiled."""

    def __init__(self, runtime: Runtime, model: LoadedModel, noise: NoiseModel, suffix: passes.Suffix, map_=map):
        self.graph = suffix.model
        # a site that is the class output itself has nothing after it: the noisy value is the output
        self.session = None if not suffix.model.graph.node else runtime.session(
            suffix.model, f"part of the model after {suffix.site}")
        self.site, self.frontier, self.noise, self.map = suffix.site, suffix.frontier, noise, map_
        self.axis = passes.sample_axis(model.types.get(self.site), model.batch_names)
        self.output = model.class_output.name
        self.reads, self.noisy = (self.site, *self.frontier), (self.site,)

    def run(self, values, sigmas, eps, device=None):
        g, y = len(sigmas), values[self.site]
        feeds = {n: _tile(values[n], g) for n in self.frontier}
        axis = self.axis if self.axis < y.ndim else 0
        noisy = self.noise.host(y, sigmas, eps.get(self.site), self.map, axis=axis).astype(y.dtype, copy=False)
        # [G, ..., N, ...] -> [..., G·N, ...], level-major along the batch axis (as `passes.graph_noise` folds)
        feeds[self.site] = np.moveaxis(noisy, 0, axis).reshape(*y.shape[:axis], g * y.shape[axis], *y.shape[axis + 1:])
        if self.session is None:
            return feeds[self.site]
        return run(self.session, [self.output], feeds, "noisy model")[0]


class WeightSuffix(Strategy):
    """A weight site: the suffix from the layers that read the weight (`passes.weight_fed`: the weight a graph
    input), fed the clean frontier and the weight perturbed on the host (`NoiseModel.host` on the initializer, one
    draw per repeat), a level at a time: a level changes the weight, so levels never share a run."""

    packs = False

    def __init__(self, runtime: Runtime, model: LoadedModel, noise: NoiseModel, suffix: passes.Suffix, map_=map):
        self.program = passes.weight_fed(suffix)
        self.graph = suffix.model
        self.session = runtime.session(self.program.model, f"part of the model after weight {suffix.site}")
        self.site, self.noise, self.map = suffix.site, noise, map_
        init = next(t for t in model.proto.graph.initializer if t.name == suffix.site)
        self.weight = onnx.numpy_helper.to_array(init)
        self.weights = {self.site: self.weight.shape}  # the weights whose draws the worker makes per repeat
        self.output = model.class_output.name
        self.reads, self.noisy = tuple(suffix.frontier), (self.site,)

    def run(self, values, sigmas, eps, device=None):
        feeds = {n: values[n] for n in self.reads}
        # an integer weight (an INT8 model's) takes value noise in float and is stored back as the kernels read it:
        # rounded and saturated (a cast would wrap 200.7 round to -56); bit flips work on the stored bits themselves
        computed = self.weight if self.noise.stored or self.weight.dtype.kind == "f" else \
            self.weight.astype(np.float32)
        outs = []
        for sigma in sigmas:
            noisy = self.noise.host(computed, [sigma], eps[self.site], self.map)[0]
            feeds[self.site] = stored_as(noisy, self.weight.dtype)
            outs.append(run(self.session, [self.output], feeds, "noisy model")[0])
        return np.concatenate(outs)


def stored_as(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`values` in `dtype`: integers rounded to the nearest and saturated to the type's range, floats cast."""
    if np.dtype(dtype).kind in "iu" and values.dtype.kind == "f":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype, copy=False)


class FedSuffix(Strategy):
    """The suffix applies the noise for G levels and tiles the frontier itself (`passes.graph_noise`); fed the
    clean values (kept on the device), σ per level and one host-drawn ε per term."""

    drawn_in_graph = False

    def __init__(self, runtime: Runtime, model: LoadedModel, noise: NoiseModel, suffix: passes.Suffix,
                 seeds: tuple[int, int] = (0, 1), tile: bool = True):
        types = model.types
        self.program = passes.graph_noise(suffix, types, "mul" in noise.terms, "add" in noise.terms, seeds=seeds,
                                          fed=not self.drawn_in_graph, noise=noise,
                                          axis=passes.sample_axis(types[suffix.site], model.batch_names), tile=tile)
        self._runtime, self._made = runtime, (model, noise, suffix, seeds)
        self.tiles = tile
        self.graph = suffix.model
        self._session = None  # made at the first run: a program used only for its one-level twin never needs one
        self.site, self.frontier, self.noise = suffix.site, suffix.frontier, _affine(noise)
        self.output = model.class_output.name
        self.reads = self.on_device = (self.site, *self.frontier)
        self.noisy = () if self.drawn_in_graph else (self.site,)
        shape = types[self.site].shape
        self.rank = None if shape is None else len(shape)
        self.dtype = types[self.site].dtype

    @property
    def session(self):
        if self._session is None:
            self._session = self._runtime.session(self.program.model, f"part of the model after {self.site}")
        return self._session

    def one_level(self) -> Strategy:
        """This strategy for runs of one σ level: the frontier is not tiled (copied) per run. Not for ε drawn in
        the graph: a second session would replay the first one's random stream."""
        if self.drawn_in_graph or not self.tiles:
            return super().one_level()
        return type(self)(self._runtime, *self._made, tile=False)

    def run(self, values, sigmas, eps, device=None):
        program = self.program
        device_inputs = {program.site: device[self.site],
                         **{name: device[f] for f, name in zip(self.frontier, program.frontier)}}
        rank = values[self.site].ndim
        host = {}
        sm, sa = self.noise.scales(sigmas)
        for name, scale in ((program.sigma_mul, sm), (program.sigma_add, sa)):
            if name:
                assert scale is not None  # a σ input only for a term the noise model has
                host[name] = scale.astype(self.dtype).reshape(-1, *([1] * (rank + 1)))
        for name, term in ((program.eps_mul, 0), (program.eps_add, -1)):  # ε[0] multiplies, ε[-1] adds
            if name:
                host[name] = np.asarray(eps[self.site][term], dtype=self.dtype)
        return run_bound(self.session, device_inputs, host, self.output, "noisy model")


class DrawnSuffix(FedSuffix):
    """`FedSuffix` with ε drawn by RandomNormalLike inside the graph."""

    drawn_in_graph = True


class FedGlobal(Strategy):
    """The model with noise after every site (`passes.inject_fed`): fed the tiled inputs, σ per level and one ε
    per site and term; the graph applies the noise."""

    def __init__(self, runtime: Runtime, model: LoadedModel, noise: NoiseModel, sites: list[str]):
        self.program = passes.inject_fed(model.proto, sites, model.types, "mul" in noise.terms, "add" in noise.terms,
                                         noise)
        self.graph = model.proto
        self.session = runtime.session(self.program.model, "model with noise at every site")
        self.noise, self.output = _affine(noise), model.class_output.name
        self.inputs = tuple(i.name for i in model.inputs)
        self.reads = (*self.inputs, *sites)  # the sites' clean values give ε its shapes
        self.noisy = tuple(sites)

    def run(self, values, sigmas, eps, device=None):
        feeds = {n: _tile(values[n], len(sigmas)) for n in self.inputs}
        sm, sa = self.noise.scales(sigmas)
        for name, scale in ((self.program.sigma_mul, sm), (self.program.sigma_add, sa)):
            if name:
                assert scale is not None  # a σ input only for a term the noise model has
                feeds[name] = scale.astype(np.float32)
        for site, eps_mul, eps_add in self.program.eps:  # ε[0] multiplies, ε[-1] adds
            for name, term in ((eps_mul, 0), (eps_add, -1)):
                if name:
                    feeds[name] = eps[site][term]
        return run(self.session, [self.output], feeds, "noisy model")[0]


class TermsGlobal(Strategy):
    """The model with y' = y·mul + add after every site (`passes.inject`), the factors computed on the host."""

    def __init__(self, runtime: Runtime, model: LoadedModel, noise: NoiseModel, sites: list[str]):
        proto, self.injections = passes.inject(model.proto, sites, model.types, "mul" in noise.terms,
                                               "add" in noise.terms)
        self.graph = model.proto
        self.session = runtime.session(proto, "model with noise at every site")
        self.noise, self.output = _affine(noise), model.class_output.name
        self.inputs = tuple(i.name for i in model.inputs)
        self.reads = (*self.inputs, *sites)  # the sites' clean values give their shapes
        self.noisy = tuple(sites)

    def run(self, values, sigmas, eps, device=None):
        g = len(sigmas)
        feeds = {n: _tile(values[n], g) for n in self.inputs}
        for inj in self.injections:
            y = values[inj.site]
            mul, add = self.noise.factors(sigmas, eps[inj.site], dtype=y.dtype)
            for term, arr in ((inj.mul, mul), (inj.add, add)):
                if term:
                    assert arr is not None  # an injection only for a term the noise model has
                    feeds[term] = arr.reshape(g * y.shape[0], *y.shape[1:])
        return run(self.session, [self.output], feeds, "noisy model")[0]
