"""Which output carries the class decision when several could: decided from the data, never silently.

A model may return more than one float [N, C] output (an embedding and the logits, say: torch's dynamo exporter names
them `relu` and `linear_1`). With labels, the candidates whose width cannot hold the largest label are dropped, and
of the rest the one whose clean predictions agree with the labels clearly best (on up to EVIDENCE_SAMPLES samples) is
the class output. Without labels, or without a clear winner, the audit is refused with one line that names the
candidates and `--output`.
"""

from __future__ import annotations

import numpy as np

from walkaudit._loading.model import ClassOutput, LoadedModel, _score_like
from walkaudit.errors import ModelError, option

#: Samples the clean accuracy of each candidate output is measured on.
EVIDENCE_SAMPLES = 512
#: How much better (in accuracy) the best candidate must be than the next one.
MARGIN = 0.2


#: Output names that say which output holds the class scores: the model's own choice stands.
NAMED = ("prob", "logit", "score")


def class_candidates(model: LoadedModel) -> list:
    """The outputs that look like class scores ([N, C], C > 1), in the model's order, when the choice among them
    is open: none when one is named like scores (`NAMED`) or the model has only one."""
    scores = [o for o in model.outputs if _score_like(o)]
    if any(k in o.name.lower() for o in scores for k in NAMED):
        return []
    return scores


def choose_class_output(model: LoadedModel, candidates: list, dataset, provider: str = "auto") -> ClassOutput:
    """The class output among `candidates` (see the module docstring); the model's own choice when every candidate
    decides the same way (logits and their softmax) or when it is as accurate as the best."""
    default = model.class_output
    names = ", ".join(f"{o.name} {o.describe()}" for o in candidates)
    refuse = f"several outputs could be the class scores ({names}); name one with {option('output')}"
    widths = {o.name: o.shape[1] if isinstance(o.shape[1], int) else None for o in candidates}
    labels, rows = dataset.labels, min(dataset.samples, EVIDENCE_SAMPLES)
    fit = candidates
    if labels is not None:
        fit = [o for o in candidates if widths[o.name] is None or widths[o.name] > int(labels[:rows].max())]
        if len(fit) == 1:
            return ClassOutput(fit[0].name, "scores", widths[fit[0].name])
    predictions = _predictions(model, [o.name for o in fit], dataset, rows, provider)
    if len({p.tobytes() for p in predictions.values()}) == 1:  # they all decide the same way
        return default if default.name in predictions else ClassOutput(fit[0].name, "scores", widths[fit[0].name])
    if labels is None:
        raise ModelError(refuse + " (they disagree, and without labels there is no evidence to choose by)")
    accuracy = {n: float((p == labels[: len(p)]).mean()) if len(p) else 0.0 for n, p in predictions.items()}
    ranked = sorted(accuracy.items(), key=lambda kv: -kv[1])
    if default.name in accuracy and accuracy[default.name] >= ranked[0][1] - 0.02:
        return default
    if len(ranked) == 1 or ranked[0][1] - ranked[1][1] >= MARGIN:
        return ClassOutput(ranked[0][0], "scores", widths[ranked[0][0]])
    shown = ", ".join(f"{n}: {a:.2f}" for n, a in ranked)
    raise ModelError(refuse + f" (clean accuracy on {rows} samples: {shown}: no clear winner)")


def _predictions(model: LoadedModel, names: list[str], dataset, rows: int, provider: str) -> dict[str, np.ndarray]:
    """Each output's argmax on the first `rows` samples (whole fixed batches only, for a fixed-batch model)."""
    from walkaudit._execution.runtime import Runtime, run

    session = Runtime(provider).session(model.proto)
    step = model.batch_size or rows
    parts = [run(session, names, {k: np.asarray(v[i : i + step]) for k, v in dataset.inputs.items()})
             for i in range(0, rows - step + 1, step)]
    outs = [np.concatenate(p) for p in zip(*parts)] if parts else [np.zeros((0, 2))] * len(names)
    return {n: o.reshape(len(o), -1).argmax(axis=1) for n, o in zip(names, outs)}
