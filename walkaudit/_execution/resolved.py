"""The resolved audit: every choice the driver made, once, as an immutable, picklable value; and the one function
that builds a Worker from it (`build`).

The driver (`walkaudit.api.AuditRun`) resolves the user's options against the model and the data: the class output
(chosen from the data among rival outputs), per-token scoring, the mask and ignore label, the labels and scored
positions, the sites (selected, sharded), the batch size, the noise model, the σ search's options, the seed, the
evaluation path's options (exact or pruned tail, where ε is drawn). Every executor (in process, Ray actors, a shard's
own run) builds its Worker from this value only, never from the user's options again, so no worker can decide
differently from the driver (a multi-output model's workers once re-chose the class output without the data's
evidence and audited the embedding).

What travels: the model's bytes (attached for another process, `with_model_bytes`; in process the driver's loaded
model is handed to `build`, checked by its sha256), the data as an absolute path every worker can read (inputs
memory-mapped there) or the arrays themselves, and always the labels and scored positions the driver resolved.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from walkaudit._execution.runtime import Runtime
from walkaudit._execution.worker import (  # noqa: F401  (for the driver)
    Worker,
    batch_size_for,
    learn_provider,
    site_axes,
)
from walkaudit._graph.index import GraphIndex
from walkaudit._graph.sites import Selection, select
from walkaudit._loading import data as data_mod
from walkaudit._loading.data import Dataset
from walkaudit._loading.model import ClassOutput, LoadedModel, TensorSpec, load_model
from walkaudit._noise import NoiseModel, NormalSource
from walkaudit.errors import RuntimeFailure


@dataclass(frozen=True)
class ResolvedData:
    """Where a worker reads the inputs, and what the driver resolved about them."""

    samples: int
    path: str | None  # absolute path of the data file or folder (inputs memory-mapped from it), or None: `arrays`
    arrays: dict[str, np.ndarray] | None  # the inputs by name, when they do not come from a path
    x_key: str | None
    y_key: str | None
    limit: int | None
    num_classes: int | None  # the classes the labels were read against (one-hot labels)
    labels: np.ndarray | None  # class ids per sample ([N, T] per token, UNSCORED where not scored), as resolved
    scored: np.ndarray | None  # per-token output: the scored positions [N, T] (None: every position)
    mask: str | None  # the model input read as the attention mask (resolved: None when there is none)
    ignore_label: int


@dataclass(frozen=True)
class ResolvedAudit:
    """Everything that decides the numbers of an audit, resolved once by the driver (see the module docstring)."""

    key: str  # the model's sha256 (units name it)
    model_path: str | None
    inputs: tuple[TensorSpec, ...]  # the model's data inputs (the data is read against them)
    class_output: ClassOutput  # name, kind, classes, per token: resolved from the model and, among rivals, the data
    data: ResolvedData
    sites: tuple[str, ...]  # the selected sites' tensor names, in site order (this shard's, when sharded)
    exposed: tuple[str, ...]  # the whole selection's (before sharding): the values the clean pass exposes
    axes: tuple[tuple[str, int | None], ...]  # per site of the selection, its batch axis by its inferred shape
    mode: str  # walk | global
    noise: NoiseModel  # the noise model as resolved from the options (its kind, ratio, bits, target)
    seed: int
    repeats: int
    sigmas: tuple[float, ...] | None  # the fixed grid (given, or the noise model's own), or None: adaptive
    site_scales: tuple[tuple[str, float], ...]
    batch_size: int  # rows per batch of the data grid (resolved: the model's fixed batch, the device's, the default)
    exact: bool  # exact sessions everywhere, the whole tail kept
    noise_source: str  # auto | host | graph
    provider: str  # requested provider (an executor may place workers on another: they say which)
    threads: int | None
    model: bytes | None = None  # the serialized model, attached for another process (`with_model_bytes`)
    targets: np.ndarray | None = None  # what counts as correct per sample, once the driver's clean pass gave it
    clean_ok: np.ndarray | None = None  # with `targets`: the clean model right per sample (pairs noisy with clean)

    def with_model_bytes(self, proto) -> ResolvedAudit:
        """This audit carrying the model itself, for a worker in another process."""
        return dataclasses.replace(self, model=proto.SerializeToString())

    def with_arrays(self) -> ResolvedAudit:
        """This audit carrying the input arrays instead of the data's path (a worker that cannot see the file)."""
        if self.data.path is None:
            return self
        arrays = {k: np.asarray(v) for k, v in self.dataset().inputs.items()}
        return dataclasses.replace(self, data=dataclasses.replace(self.data, path=None, arrays=arrays))

    def build(self, threads: int | None = None, provider: str | None = None, *, model: LoadedModel | None = None,
              dataset: Dataset | None = None, runtime: Runtime | None = None, index: GraphIndex | None = None,
              **knobs) -> Worker:
        """The Worker of this audit, on `threads` CPU threads and `provider` (default: the audit's). `model`,
        `dataset`, `runtime`, `index`: the driver's own, handed over in process instead of loading again (the model
        checked by its sha256; its class output and the data's labels are this audit's, whatever they hold).
        `knobs`: Worker's test knobs (`strategy`, `pack`, `cache_bytes`)."""
        loaded = self.loaded(model)
        data = self.dataset(dataset)
        threads = threads or self.threads
        runtime = runtime or Runtime(provider or self.provider, threads, self.exact)
        sites = select(loaded.proto, loaded.types, Selection(names=self.sites), loaded.class_output.name,
                       index=index, target=self.noise.target, stored=self.noise.stored)
        return Worker(loaded, data, runtime=runtime, noise=self.noise,
                      source=NormalSource(self.seed, threads), sites=sites, mode=self.mode,
                      batch_size=self.batch_size, noise_source=self.noise_source, key=self.key,
                      index=index, targets=self.targets,
                      clean_ok=self.clean_ok if self.targets is not None else None, exposed=self.exposed,
                      axes=dict(self.axes), **knobs)

    def loaded(self, model: LoadedModel | None = None) -> LoadedModel:
        """The model, with this audit's class output (never chosen again)."""
        if model is None:
            if self.model is None:
                raise RuntimeFailure("a worker was asked to build an audit that carries no model")
            import onnx

            model = load_model(onnx.load_from_string(self.model), self.class_output.name)
            model.sha256 = self.key
        elif (model.sha256 or "in-memory model") != self.key:
            raise RuntimeFailure(f"a worker was handed model {str(model.sha256)[:12]} for an audit of {self.key[:12]}")
        return dataclasses.replace(model, class_output=self.class_output)

    def dataset(self, dataset: Dataset | None = None) -> Dataset:
        """The data: the inputs from the path or the arrays (or the driver's `dataset`), with the labels, scored
        positions and mask as resolved."""
        d = self.data
        if dataset is None:
            if d.path is not None:
                out = self.class_output
                dataset = data_mod.load(d.path, list(self.inputs), x_key=d.x_key, y_key=d.y_key, limit=d.limit,
                                        num_classes=d.num_classes, allow_nonfinite=True, digest=False,
                                        per_token=out.per_token, ignore_label=d.ignore_label, mask=d.mask)
            else:
                dataset = data_mod.from_arrays(d.arrays, None, list(self.inputs), allow_nonfinite=True)
        if dataset.samples != d.samples:
            raise RuntimeFailure(f"a worker read {dataset.samples} samples where the driver read {d.samples}")
        return dataclasses.replace(dataset, labels=d.labels, scored=d.scored, mask=d.mask)


def resolve(loaded: LoadedModel, dataset: Dataset, sites, selected, config, noise: NoiseModel, batch_size: int,
            num_classes: int | None) -> ResolvedAudit:
    """The resolved audit of a driver's choices: its loaded model (class output chosen), its data (read against
    `num_classes`), its sites (this shard's) among the `selected` ones, its options, its noise model and its batch
    size."""
    path = os.path.abspath(dataset.path) if dataset.path else None
    arrays = None if path else {k: np.asarray(v) for k, v in dataset.inputs.items()}
    data = ResolvedData(dataset.samples, path, arrays, config.x_key, config.y_key, config.limit, num_classes,
                        dataset.labels, dataset.scored, dataset.mask, config.ignore_label)
    return ResolvedAudit(loaded.sha256 or "in-memory model", loaded.path, tuple(loaded.inputs), loaded.class_output,
                         data, tuple(s.name for s in sites), tuple(s.name for s in selected),
                         site_axes(loaded, [s.name for s in selected]), config.mode, noise,
                         config.seed, config.repeats, config.sigmas or noise.grid(), config.site_scales, batch_size,
                         config.exact, config.noise_source, config.provider, config.threads)
