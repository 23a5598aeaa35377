"""Which output carries the class decision when several could: decided from the data, never silently.

A model may return more than one float [N, C] output (an embedding and the logits, say: torch's dynamo exporter names
them `relu` and `linear_1`). With labels, the candidates whose width cannot hold the largest label are dropped, and
of the rest the one whose clean predictions agree with the labels clearly best (on up to EVIDENCE_SAMPLES samples) is
the class output. Without labels, or without a clear winner, the audit is refused with one line that names the
candidates and `--output`.

Outputs of scores per position ([N, T, C], a tagger's or a language model's: logits and hidden states, say) are
chosen the same way among themselves, by the classes (last axis) and the accuracy over the scored positions.
"""

from __future__ import annotations

import numpy as np

from walkaudit._loading.model import (
    ClassOutput,
    LoadedModel,
    _score_like,
    _token_like,
    named_like_scores,
)
from walkaudit._units import UNSCORED
from walkaudit.errors import ModelError, option

#: Samples the clean accuracy of each candidate output is measured on.
EVIDENCE_SAMPLES = 512
#: How much better (in accuracy) the best candidate must be than the next one.
MARGIN = 0.2


def class_candidates(model: LoadedModel) -> list:
    """The outputs that look like class scores ([N, C], C > 1; [N, T, C] for a per-token class output), in the
    model's order, when the choice among them is open: none when one is named like scores (`model.SCORE_NAMES`) or the
    model has only one."""
    like = _token_like if model.class_output.per_token else _score_like
    scores = [o for o in model.outputs if like(o)]
    if any(named_like_scores(o) for o in scores):
        return []
    return scores


def choose_class_output(model: LoadedModel, candidates: list, dataset, provider: str = "auto") -> ClassOutput:
    """The class output among `candidates` (see the module docstring); the model's own choice when every candidate
    decides the same way (logits and their softmax) or when it is as accurate as the best."""
    default, tokens = model.class_output, model.class_output.per_token
    names = ", ".join(f"{o.name} {o.describe()}" for o in candidates)
    refuse = f"several outputs could be the class scores ({names}); name one with {option('output')}"
    widths = {o.name: o.shape[-1] if isinstance(o.shape[-1], int) else None for o in candidates}

    def chosen(name: str) -> ClassOutput:
        return ClassOutput(name, "scores", widths[name], per_token=tokens)

    labels, rows = dataset.labels, min(dataset.samples, EVIDENCE_SAMPLES)
    fit = candidates
    if labels is not None:
        top = int(labels[:rows].max())  # UNSCORED positions are far below any class
        fit = [o for o in candidates if (width := widths[o.name]) is None or width > top]
        if len(fit) == 1:
            return chosen(fit[0].name)
    predictions = _predictions(model, [o.name for o in fit], dataset, rows, provider, tokens)
    if len({p.tobytes() for p in predictions.values()}) == 1:  # they all decide the same way
        return default if default.name in predictions else chosen(fit[0].name)
    if labels is None:
        raise ModelError(refuse + " (they disagree, and without labels there is no evidence to choose by)")
    accuracy = {n: _accuracy(p, labels[: len(p)]) for n, p in predictions.items()}
    ranked = sorted(accuracy.items(), key=lambda kv: -kv[1])
    if default.name in accuracy and accuracy[default.name] >= ranked[0][1] - 0.02:
        return default
    if len(ranked) == 1 or ranked[0][1] - ranked[1][1] >= MARGIN:
        return chosen(ranked[0][0])
    shown = ", ".join(f"{n}: {a:.2f}" for n, a in ranked)
    raise ModelError(refuse + f" (clean accuracy on {rows} samples: {shown}: no clear winner)")


def _accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Share of the scored entries (all of them, or a per-token output's scored positions) predicted right; 0 when
    there are none or the shapes differ (an output that cannot be the one the labels describe)."""
    scored = labels != UNSCORED
    if pred.shape != labels.shape or not scored.any():
        return 0.0
    return float((pred == labels)[scored].mean())


def _predictions(model: LoadedModel, names: list[str], dataset, rows: int, provider: str,
                 per_token: bool = False) -> dict[str, np.ndarray]:
    """Each output's argmax on the first `rows` samples (whole fixed batches only, for a fixed-batch model): over
    the classes of each sample, or over the last axis (a class per position) with `per_token`."""
    from walkaudit._execution.runtime import Runtime, run

    session = Runtime(provider).session(model.proto)
    step = model.batch_size or rows
    parts = [run(session, names, {k: np.asarray(v[i : i + step]) for k, v in dataset.inputs.items()})
             for i in range(0, rows - step + 1, step)]
    outs = [np.concatenate(p) for p in zip(*parts)] if parts else [np.zeros((0, 2))] * len(names)
    if per_token:
        return {n: o.argmax(axis=-1) if o.ndim == 3 else np.zeros((0, 0), np.int64) for n, o in zip(names, outs)}
    return {n: o.reshape(len(o), -1).argmax(axis=1) for n, o in zip(names, outs)}
