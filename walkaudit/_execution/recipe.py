"""A Recipe: everything a worker in another process needs to build the same Worker as the driver's, by value.

Workers are built from a recipe, never from a live session: the model's bytes (sent once, through the object store
of a cluster), where to read the data (a path every worker sees) or the arrays themselves, the audit's options, the
selected sites and, when the driver ran the clean pass, its targets (labels, or the clean model's predictions), so
that the worker needs no clean pass of its own. Without them a worker runs the clean pass itself, over the rows it
serves (`Worker.clean_pass(rows=...)`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from walkaudit._execution.runtime import Runtime
from walkaudit._execution.worker import Worker
from walkaudit._graph.sites import Selection, select
from walkaudit._loading import data as data_mod
from walkaudit._loading.data import Dataset
from walkaudit._loading.model import load_model
from walkaudit._noise import NormalSource
from walkaudit.config import AuditConfig


@dataclass(frozen=True)
class Recipe:
    key: str  # the model's sha256: units name it
    model: bytes  # the serialized model
    data: str | None  # an absolute path every worker can read (memory-mapped there), or None: `arrays`
    arrays: dict[str, np.ndarray] | None
    config: AuditConfig
    sites: tuple[str, ...]
    targets: np.ndarray | None  # class id per sample from the driver's clean pass; None: the worker runs its own
    batch_size: int
    #: with `arrays`: the data's labels and scored positions as the driver loaded them (`Dataset.labels`, `.scored`)
    labels: np.ndarray | None = None
    scored: np.ndarray | None = None
    clean_ok: np.ndarray | None = None  # with `targets`: the clean model right per sample (pairs noisy with clean)

    @classmethod
    def of(cls, run) -> Recipe:
        """The recipe of a driver's AuditRun (with the targets when its clean pass has run)."""
        worker = run._worker
        path = os.path.abspath(run.dataset.path) if run.dataset.path else None
        recipe = cls(worker.key, run.loaded.proto.SerializeToString(), path, None, run.config,
                     tuple(s.name for s in run.sites), worker._targets, worker.batch_size,
                     clean_ok=worker._clean_ok)
        return recipe if path else recipe.with_arrays(run.dataset)

    def with_arrays(self, dataset: Dataset) -> Recipe:
        """This recipe carrying the data itself (inputs, labels, scored positions) instead of its path."""
        return dataclasses.replace(self, data=None, arrays={k: np.asarray(v) for k, v in dataset.inputs.items()},
                                   labels=dataset.labels, scored=dataset.scored)

    def build(self, threads: int | None = None, provider: str | None = None) -> Worker:
        """A Worker equal to the driver's, on `threads` CPU threads and `provider` (default: the config's)."""
        import onnx

        config = self.config
        loaded = load_model(onnx.load_from_string(self.model), config.output)
        if self.data is not None:
            dataset = data_mod.load(self.data, loaded.inputs, x_key=config.x_key, y_key=config.y_key,
                                    limit=config.limit, allow_nonfinite=True, digest=False,
                                    per_token=loaded.class_output.per_token, ignore_label=config.ignore_label,
                                    mask=config.mask)
        else:
            dataset = dataclasses.replace(data_mod.from_arrays(self.arrays, None, loaded.inputs, allow_nonfinite=True),
                                          labels=self.labels, scored=self.scored)
        noise = config.noise_model()
        sites = select(loaded.proto, loaded.types, Selection(names=self.sites), loaded.class_output.name,
                       target=noise.target, stored=noise.stored)
        runtime = Runtime(provider or config.provider, threads or config.threads, config.exact)
        return Worker(loaded, dataset, runtime=runtime, noise=noise,
                      source=NormalSource(config.seed, threads or config.threads), sites=sites, mode=config.mode,
                      batch_size=self.batch_size, noise_source=config.noise_source, key=self.key,
                      targets=self.targets, clean_ok=self.clean_ok if self.targets is not None else None)
