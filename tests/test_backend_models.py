"""σ = 0 reproduces the original outputs bit for bit at every candidate site of onnx's bundled backend models.

For every model under `onnx/backend/test/data/` (light, pytorch-converted, pytorch-operator, simple, ...) that
onnxruntime runs, with every float node output as a site (`--ops all`), both noise paths must give back the original
outputs exactly (np.array_equal, NaN equal to NaN) when σ = 0:

- graph path: `rewrite.inject` at every site at once, fed mul = 1 and add = 0;
- walk path: `rewrite.suffix` of each site to each graph output the site reaches, fed the clean site value and the
  clean frontier values (read from the clean model with the sites exposed).

The clean model with the sites exposed must give the original outputs too (the engine's clean pass reads them there).

Inputs: `test_data_set_0/input_*.pb` where the case has them; the `light` models ship none, so they get uniform
[0, 1) numbers from numpy's default_rng(0) (onnx's own runner makes up its inputs for them as well).

The light zoo models have 22 to 668 sites and rebuilding weights made by ConstantOfShape costs up to 2 s per
session, so their walk path is checked at SAMPLE sites spread evenly over the graph (first and last included);
WALKAUDIT_BACKEND_ALL_SITES=1 checks every site (7 minutes on 2 cores; all pass). Their graph path always covers every
site.

Models that cannot be checked are listed with the reason in docs/backend-models.md, and that list decides at
collection which cases become tests: a listed model is no test (it is not collected, so it is not reported as a
skip), every other model is one, and one of those that cannot be checked fails naming the list.
`test_skip_list_matches_doc` keeps the list honest: every listed model still cannot be checked, for the reason given,
and the list and the collected cases together are every bundled model. Regenerate the list with
`python tests/test_backend_models.py`.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.backend.test
import pytest
from onnx import numpy_helper

from walkaudit._graph import passes as rewrite
from walkaudit._graph import queries as g
from walkaudit._graph.sites import ALL, candidates
from walkaudit._loading.model import prepare_for_runtime, read_model, value_types

pytestmark = pytest.mark.slow  # the quick run (`python -m pytest -q`) leaves this module out

DATA = Path(onnx.backend.test.__file__).parent / "data"
DOC = Path(__file__).resolve().parents[1] / "docs" / "backend-models.md"
SAMPLE = 4
ALL_SITES = os.environ.get("WALKAUDIT_BACKEND_ALL_SITES") == "1"


@dataclass(frozen=True)
class Case:
    kind: str  # the folder under data/: light, pytorch-converted, ...
    name: str
    path: Path  # model.onnx, or for `light` the .onnx file itself, or for `real` the data.json pointer

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.name}"


def discover() -> list[Case]:
    cases = []
    for kind in sorted(p.name for p in DATA.iterdir() if p.is_dir()):
        folder = DATA / kind
        if kind == "light":
            cases += [Case(kind, f.stem, f) for f in sorted(folder.glob("*.onnx"))]
            continue
        for case in sorted(p for p in folder.iterdir() if p.is_dir()):
            model = case / "model.onnx"
            cases.append(Case(kind, case.name, model if model.exists() else next(case.iterdir(), case)))
    return cases


CASES = discover()


def _doc_table(text: str) -> dict[str, str]:
    """docs/backend-models.md's skip list: case id -> reason."""
    rows = re.findall(r"^\| `([^`]+)` \| (.+?) \|$", text, flags=re.MULTILINE)
    return dict(rows)


#: the documented skip list (case id -> reason), read at collection: these cases are no tests
DOCUMENTED = _doc_table(DOC.read_text()) if DOC.exists() else {}
#: the cases that become tests
CHECKED = [c for c in CASES if c.id not in DOCUMENTED]


# -- helpers --------------------------------------------------------------------------------------------------------
def session(proto: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _read_value(path: Path, vi: onnx.ValueInfoProto):
    data = path.read_bytes()
    which = vi.type.WhichOneof("value")
    if which == "tensor_type":
        proto = onnx.TensorProto()
        proto.ParseFromString(data)
        return numpy_helper.to_array(proto)
    if which == "sequence_type":
        proto = onnx.SequenceProto()
        proto.ParseFromString(data)
        return numpy_helper.to_list(proto)
    if which == "optional_type":
        proto = onnx.OptionalProto()
        proto.ParseFromString(data)
        return numpy_helper.to_optional(proto)
    raise NotImplementedError(f"input {vi.name!r} of type {which}")


def feeds_for(case: Case, proto: onnx.ModelProto) -> dict:
    inits = {i.name for i in proto.graph.initializer}
    inputs = [vi for vi in proto.graph.input if vi.name not in inits]
    if case.kind == "light":
        rng = np.random.default_rng(0)
        return {vi.name: rng.random(tuple(d.dim_value or 1 for d in vi.type.tensor_type.shape.dim), dtype=np.float32)
                for vi in inputs}
    folder = case.path.parent / "test_data_set_0"
    return {vi.name: _read_value(folder / f"input_{i}.pb", vi) for i, vi in enumerate(inputs)}


def same(a, b) -> bool:
    """Bit for bit: same type, dtype, shape and values (NaN equal to NaN); sequences element by element."""
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    line = next((t for t in text.splitlines() if t.strip()), type(exc).__name__)
    kernel = re.search(r"Could not find an implementation for (\w+\(\d+\))", line)
    if kernel:
        return f"onnxruntime has no CPU kernel for {kernel.group(1)}"
    if "Failed to construct locale" in text:
        return "onnxruntime cannot construct the en_US.UTF-8 locale here"
    line = line.split(" : ")[-1] if " : " in line else line
    return f"onnxruntime refuses it: {line.strip()[:160]}"


@dataclass
class Loaded:
    proto: onnx.ModelProto
    types: dict
    sites: list[str]
    feeds: dict
    reference: dict  # output name -> original output


#: case id -> skip reason (None: checked), filled as cases are examined.
SEEN: dict[str, str | None] = {}


def examine(case: Case) -> tuple[str | None, Loaded | None]:
    """(skip reason, None) or (None, what the check needs)."""
    reason, loaded = _examine(case)
    SEEN[case.id] = reason
    return reason, loaded


def _examine(case: Case) -> tuple[str | None, Loaded | None]:
    if case.path.suffix != ".onnx":
        target = case.path.read_text() if case.path.is_file() else ""
        url = re.search(r'"url":\s*"([^"]+)"', target)
        where = url.group(1).split("/data/")[-1].removesuffix(".onnx") if url else "elsewhere"
        return f"no model file: {case.path.name} points at {where}, checked there", None
    proto, _, _ = read_model(case.path)
    prepare_for_runtime(proto)
    types = value_types(proto)
    sites = [s.name for s in candidates(proto, types, (ALL,))]
    if not sites:
        return "no candidate site (no node writes a float tensor)", None
    try:
        sess = session(proto)
    except Exception as exc:  # noqa: BLE001 -- whatever onnxruntime refuses is a reason to skip
        return _short(exc), None
    feeds = feeds_for(case, proto)
    outputs = [o.name for o in proto.graph.output]
    try:
        reference = dict(zip(outputs, sess.run(outputs, feeds)))
    except Exception as exc:  # noqa: BLE001
        return f"onnxruntime fails running it: {_short(exc)}", None
    return None, Loaded(proto, types, sites, feeds, reference)


def walk_sites(case: Case, sites: list[str]) -> list[str]:
    if ALL_SITES or case.kind != "light" or len(sites) <= SAMPLE:
        return sites
    return [sites[i] for i in sorted({int(i) for i in np.linspace(0, len(sites) - 1, SAMPLE).round()})]


def reached_outputs(proto: onnx.ModelProto, site: str) -> list[str]:
    """Tensor outputs of the graph that depend on `site` (or are the site)."""
    made_by = g.producers(proto.graph)
    after = g.descendants(proto.graph, site)
    return [o.name for o in proto.graph.output
            if o.type.WhichOneof("value") == "tensor_type" and (o.name == site or made_by.get(o.name) in after)]


# -- the check --------------------------------------------------------------------------------------------------------
#: cases over 60 M parameters (10-15 s each here): marked slow
HEAVY = {"light/light_vgg19", "light/light_zfnet512", "light/light_bvlc_alexnet"}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=pytest.mark.slow if c.id in HEAVY else ())
                                  for c in CHECKED])
def test_sigma_zero_is_bit_identical(case: Case):
    reason, m = examine(case)
    assert reason is None, (f"{case.id} cannot be checked ({reason}) but docs/backend-models.md does not list it: "
                            "regenerate the list with python tests/test_backend_models.py")
    proto, types, feeds, reference = m.proto, m.types, m.feeds, m.reference
    before = proto.SerializeToString()
    outputs = list(reference)

    plans = {}
    for site in walk_sites(case, m.sites):
        for out in reached_outputs(proto, site):
            plans[site, out] = rewrite.suffix_plan(proto, site, out)
    needed = [n for n in dict.fromkeys([*m.sites, *(f for _, fr in plans.values() for f in fr)]) if n not in feeds]
    exposed = session(rewrite.expose(proto, needed, types))
    got = exposed.run([*outputs, *needed], feeds)
    clean = dict(zip(needed, got[len(outputs):]))
    clean.update(feeds)
    failures = [f"exposed clean model changes output {o!r}" for o, v in zip(outputs, got) if not same(v, reference[o])]

    # graph path: every site at once, mul = 1, add = 0
    injected, injections = rewrite.inject(proto, m.sites, types, has_mul=True, has_add=True)
    assert len(injections) == len(m.sites)
    terms = dict(feeds)
    for inj in injections:
        terms[inj.mul] = np.ones_like(clean[inj.site])
        terms[inj.add] = np.zeros_like(clean[inj.site])
    noisy = dict(zip(outputs, session(injected).run(outputs, terms)))
    failures += [f"inject: output {o!r} differs" for o in outputs if not same(noisy[o], reference[o])]

    # walk path: each site's suffix to each output it reaches, fed clean values
    for (site, out), (_, frontier) in plans.items():
        part = rewrite.suffix(proto, site, out, types)
        assert part.frontier == frontier
        value = session(part.model).run([out], {n: clean[n] for n in (site, *part.frontier)})[0]
        if not same(value, reference[out]):
            failures.append(f"suffix of {site!r}: output {out!r} differs")

    assert proto.SerializeToString() == before, "a rewrite modified the model it was given"
    assert not failures, f"{len(failures)} mismatches at σ = 0 (of {len(m.sites)} sites): " + "; ".join(failures[:10])
    assert plans, "no site reaches a tensor output"


# -- the skip list ----------------------------------------------------------------------------------------------------
def skip_table(cases: list[Case] = CASES) -> dict[str, str]:
    """Case id -> why it cannot be checked, for those of `cases` that cannot."""
    for case in cases:
        if case.id not in SEEN:
            examine(case)
    return {case.id: SEEN[case.id] for case in cases if SEEN[case.id] is not None}


def test_skip_list_matches_doc():
    """Every listed model is bundled and still cannot be checked, for the reason listed. The models not listed are
    examined by their own tests, which fail naming the list where one cannot be checked: so the list is held against
    reality both ways, and the heavy models are loaded only where their (slow) tests run."""
    assert DOC.exists(), f"{DOC} is missing: run python tests/test_backend_models.py"
    documented = _doc_table(DOC.read_text())
    bundled = {c.id for c in CASES}
    assert set(documented) <= bundled, f"listed but not bundled with this onnx: {sorted(set(documented) - bundled)}"
    actual = skip_table([c for c in CASES if c.id in documented])
    assert documented == actual, (
        "docs/backend-models.md is out of date (regenerate with python tests/test_backend_models.py): "
        f"listed but not skipped: {sorted(set(documented) - set(actual))}; "
        f"skipped but not listed: {sorted(set(actual) - set(documented))}; "
        f"reason changed: {sorted(k for k in set(actual) & set(documented) if actual[k] != documented[k])}")


def write_doc() -> str:
    import onnxruntime as ort

    skipped = skip_table()
    checked = len(CASES) - len(skipped)
    reasons: dict[str, int] = {}
    for r in skipped.values():
        key = re.sub(r"\(\d+\)$", "", r) if "kernel" in r else r.split(":")[0] if r.startswith("no model") else r
        reasons[key] = reasons.get(key, 0) + 1
    lines = [
        "# Bundled onnx backend models: σ = 0 check",
        "",
        "`tests/test_backend_models.py` checks that noise with σ = 0 reproduces the original outputs bit for bit at",
        "every candidate site (`--ops all`) of every model under onnx's `onnx/backend/test/data/`, on both paths:",
        "`rewrite.inject` (all sites at once, fed mul = 1, add = 0) and `rewrite.suffix` (each site, fed the clean",
        "site value and frontier). The light zoo models have their walk path checked at a sample of sites by default;",
        "`WALKAUDIT_BACKEND_ALL_SITES=1` checks every site.",
        "",
        (f"Generated by `python tests/test_backend_models.py` with onnx {onnx.__version__} and onnxruntime "
         f"{ort.__version__}: {len(CASES)} cases, {checked} checked, {len(skipped)} skipped."),
        ("Models of opset < 7 get their noise nodes after `rewrite.inject` converts its copy to opset 7 "
         "(onnxruntime has no Mul/Add kernel before opset 7)."),
        "",
        "Skipped, by reason: "
        + "; ".join(f"{k} ({v})" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])) + ".",
        "",
        "| model | reason |",
        "| --- | --- |",
        *(f"| `{k}` | {v} |" for k, v in skipped.items()),
        "",
    ]
    text = "\n".join(lines)
    DOC.write_text(text)
    return text


if __name__ == "__main__":  # regenerate docs/backend-models.md
    sys.stdout.write(write_doc())
