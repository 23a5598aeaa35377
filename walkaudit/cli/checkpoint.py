"""Resumable audits: the finished sites, saved after each one, and what they were made from.

A checkpoint is a JSON file, replaced atomically after every finished site:

    {"format": "walkaudit.checkpoint/1", "fingerprint": {...}, "sites": [site dicts in the report's schema]}

The fingerprint holds the model's and the data's sha256 and every setting that changes the numbers (noise, ratio,
mode, sigmas, repeats, seed, site selection, limit, chance, output, noise source, exact, data keys, non-finite
policy; `AuditConfig.fingerprint()`), but not batch size, threads or provider. `--resume` reuses the sites only when
the fingerprint is the same; otherwise it refuses with one line that names what differs.

Where: `--checkpoint PATH`; else `<--json PATH>.checkpoint` when --json is a file; else
`.walkaudit/checkpoint-<12 hex>.json` in the current folder (12 hex digits of the fingerprint's sha256).

Only walkaudit's own file is ever replaced or deleted there (`check_path`, before any work): a symlink, anything but
a regular file, an existing file that is not a checkpoint, or a path that is also an output or an input is refused
with one line; a checkpoint is read with the checks a report gets (a regular file, at most MAX_REPORT_BYTES) and
never written through a symlink. The temporaries of a write killed with -9 are deleted at the next start
(`clean_stale`). `load` checks every saved site as a report's site (schema and numbers), `check_against` the
sites against the audit about to run (selected, same index, no more samples than the data).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

from walkaudit.cli.outputs import readable, write_atomic
from walkaudit.errors import UsageError

FORMAT = "walkaudit.checkpoint/1"
FOLDER = ".walkaudit"
SUFFIX = ".checkpoint"

# fingerprint key -> how the user sets it (for the one-line refusal)
FLAGS = {
    "noise": "--noise", "ratio": "--ratio", "bits": "--bits", "target": "--target", "mode": "--global",
    "sigmas": "--sigmas", "repeats": "--repeats",
    "seed": "--seed", "selection": "--ops/--include/--exclude/--site", "limit": "--limit", "chance": "--chance",
    "output": "--output", "noise_source": "--noise-source", "exact": "--exact", "x_key": "--x-key",
    "y_key": "--y-key", "allow_nonfinite": "--allow-nonfinite", "quick": "--quick",
}


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(model_sha256: str, data_sha256: str | None, config) -> dict:
    """What a checkpoint's sites were made from, as `walkaudit.api.AuditRun.fingerprint` gives it: the files'
    sha256 and `AuditConfig.fingerprint()` (every option that changes results; not batch size, threads, provider)."""
    return {"model_sha256": model_sha256, "data_sha256": data_sha256, "config": config.fingerprint()}


def fingerprint_files(model_path, data_path, config) -> dict:
    """The fingerprint of an audit of these files, known before the audit loads them (OSError: unreadable)."""
    from walkaudit._loading.data import sha256_of

    return fingerprint(sha256_file(model_path), sha256_of(data_path), config)


def digest(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def default_path(json_path: str | None, fp: dict, cwd: str | None = None) -> str:
    """`<json>.checkpoint` next to a --json file; else .walkaudit/checkpoint-<12 hex>.json in the current folder."""
    if json_path and json_path != "-":
        return json_path + SUFFIX
    return os.path.join(cwd or os.getcwd(), FOLDER, f"checkpoint-{digest(fp)[:12]}.json")


def _show(key: str, value) -> str:
    flag = FLAGS.get(key, key)
    if key == "mode":
        return "--global" if value == "global" else "no --global"
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    if value is None:
        return f"no {flag}" if key not in ("sigmas",) else "the adaptive search (no --sigmas)"
    if key == "sigmas":
        return f"--sigmas {','.join(f'{s:g}' for s in value)}"
    if key == "selection":
        parts = [f"--ops {','.join(value.get('ops') or [])}"]
        parts += [f"--include {value['include']}"] if value.get("include") else []
        parts += [f"--exclude {value['exclude']}"] if value.get("exclude") else []
        parts += [f"--site {n}" for n in value.get("names") or []]
        return " ".join(parts)
    return f"{flag} {value}"


def difference(saved: dict, current: dict) -> str | None:
    """What differs between a checkpoint's fingerprint and this run's, in words; None when they are the same."""
    if saved == current:
        return None
    if saved.get("model_sha256") != current.get("model_sha256"):
        return (f"the model changed since the checkpoint (sha256 {str(saved.get('model_sha256'))[:12]}… now "
                f"{str(current.get('model_sha256'))[:12]}…)")
    if saved.get("data_sha256") != current.get("data_sha256"):
        return (f"the data changed since the checkpoint (sha256 {str(saved.get('data_sha256'))[:12]}… now "
                f"{str(current.get('data_sha256'))[:12]}…)")
    old, new = saved.get("config") or {}, current.get("config") or {}
    for key in [*new, *(k for k in old if k not in new)]:
        if old.get(key) != new.get(key):
            return f"the checkpoint was made with {_show(key, old.get(key))}, this run uses {_show(key, new.get(key))}"
    return "the checkpoint was made for another audit"


def _read(path: str, what: str) -> str | None:
    """The text of the checkpoint file at `path`, None when there is none, with the checks a report gets when it
    is read (walkaudit.report.model.read_limited: a regular file of at most MAX_REPORT_BYTES) and never through a
    symlink. `what` starts each one-line refusal (e.g. '--resume: ')."""
    from walkaudit.report.model import read_limited

    try:
        raw = read_limited(path, "checkpoint", links=False)
    except FileNotFoundError:
        return None
    except UsageError as exc:
        raise UsageError(f"{what}{exc}; remove it or give another --checkpoint") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{what}{path} is not a walkaudit checkpoint (not UTF-8 text)") from None


def _parse(path: str, text: str, what: str) -> dict:
    """The checkpoint's JSON object; UsageError when the text is not a walkaudit checkpoint."""
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise UsageError(f"{what}{path} is not a walkaudit checkpoint (corrupt JSON: {exc})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        found = body.get("format") if isinstance(body, dict) else type(body).__name__
        raise UsageError(f"{what}{path} is not a walkaudit checkpoint (format {found!r}, expected {FORMAT})")
    return body


def check_path(path: str, outputs=(), inputs=()) -> bool:
    """Refuse, before any work, a checkpoint path walkaudit must not write: a symlink, anything but a regular file,
    an existing file that is not a walkaudit checkpoint (the user's: never overwritten, never deleted), a path that
    is also an output (`outputs`: (flag, path) pairs, '-' and None skipped) or an input (`inputs`: (what, path)).
    Returns whether a checkpoint exists there."""
    from walkaudit.cli.outputs import same_file

    if os.path.islink(path):
        _read(path, "")  # refuses it, in the words the reader uses
    for flag, other in outputs:
        if other and other != "-" and same_file(path, other):
            raise UsageError(f"{flag} {other} is the checkpoint of this audit ({path}); write it elsewhere")
    for what, other in inputs:
        if other and other != "-" and same_file(path, other):
            raise UsageError(f"the checkpoint {path} would overwrite {what} ({other}); give another --checkpoint")
    text = _read(path, "")
    if text is None:
        return False
    try:
        _parse(path, text, "")
    except UsageError as exc:
        raise UsageError(f"{exc}; walkaudit does not overwrite it: remove it or give another --checkpoint") from None
    return True


def clean_stale(path: str) -> list[str]:
    """Delete the temporaries a killed write of this checkpoint left next to it; returns their paths."""
    from walkaudit.cli.outputs import stale_temporaries

    removed = []
    for tmp in stale_temporaries(path):
        with contextlib.suppress(OSError):
            os.unlink(tmp)
            removed.append(tmp)
    return removed


def load(path: str, fp: dict) -> list[dict]:
    """The finished sites of the checkpoint at `path`, made by an audit with this fingerprint.

    Refuses with a one-line UsageError (exit 2): no checkpoint, not a checkpoint (or not a regular file, or too
    large), made for another audit, or sites whose numbers break the report's schema or disagree with each other.
    """
    text = _read(path, "--resume: ")
    if text is None:
        raise UsageError(f"--resume: no checkpoint at {path} (nothing to resume; run without --resume)")
    body = _parse(path, text, "--resume: ")
    sites, saved = body.get("sites"), body.get("fingerprint")
    if not isinstance(saved, dict):
        raise UsageError(f"--resume: {path} is a corrupt checkpoint (no fingerprint)")
    if not isinstance(sites, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str)
                                              and isinstance(s.get("points"), list) for s in sites):
        raise UsageError(f"--resume: {path} is a corrupt checkpoint (its sites are not site results)")
    names = [s["name"] for s in sites]
    if len(set(names)) != len(names):
        raise UsageError(f"--resume: {path} is a corrupt checkpoint (a site appears twice)")
    why = difference(saved, json.loads(json.dumps(fp)))  # compared as JSON: tuples and lists alike
    if why:
        raise UsageError(f"--resume: {why}; rerun without --resume to start over")
    _check_sites(path, sites)
    return sites


def _check_sites(path: str, sites: list[dict]) -> None:
    """Every saved site as a report's site: the schema and its numbers (walkaudit.report.model)."""
    from walkaudit.report.model import SiteResult

    for k, site in enumerate(sites):
        try:
            SiteResult.from_dict(site)
        except UsageError as exc:
            raise UsageError(f"--resume: {path} is a corrupt checkpoint (sites[{k}]: {exc})") from None


def check_against(sites: list[dict], selected, samples: int | None) -> None:
    """The resumed sites against the audit about to run: each is a selected site with its index there (`selected`:
    the run's Sites), and no point counts more than `samples` (the data's; None when unknown before the clean pass,
    as for per-token outputs, where the report's own check catches it)."""
    index = {s.name: s.index for s in selected}
    for site in sites:
        name = site["name"]
        if name != "global" and name not in index:
            raise UsageError(f"--resume: the checkpoint holds site {name!r}, which this audit does not select")
        if name in index and site.get("index") != index[name]:
            raise UsageError(f"--resume: the checkpoint gives site {name!r} index {site.get('index')!r}; it is "
                             f"{index[name]} in this audit")
        for point in site["points"]:
            if samples is not None and point.get("samples", 0) > samples:
                raise UsageError(f"--resume: the checkpoint's site {name!r} counts {point['samples']} samples; the "
                                 f"data has {samples}")


class Checkpoint:
    """The checkpoint of one running audit: `add` a finished site (saved at once), `remove` at the end.

    A checkpoint that cannot be written does not stop the audit: `add` returns the error once (the caller warns),
    then the audit goes on without one.
    """

    def __init__(self, path: str, fp: dict, sites: list[dict] | None = None, make_folder: bool = False):
        self.path = path
        self.fingerprint = fp
        self.sites = list(sites or [])
        self.make_folder = make_folder  # the default .walkaudit/ folder: created on the first write, removed if empty
        self.broken: str | None = None

    def add(self, site: dict) -> str | None:
        """Record a finished site and save; returns an error message the first time saving fails, else None."""
        if any(s.get("name") == site.get("name") for s in self.sites):
            return None  # a resumed site coming back from the core
        self.sites.append(site)
        if self.broken:
            return None
        try:
            if self.make_folder:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
            write_atomic(self.path, readable(self.dumps(), "the checkpoint", "--resume would refuse it; the sites "
                                                     "saved so far stay"), through_links=False)
        except (UsageError, OSError, TypeError, ValueError) as exc:
            self.broken = str(exc)
            return self.broken
        return None

    def dumps(self) -> str:
        return json.dumps({"format": FORMAT, "fingerprint": self.fingerprint, "sites": self.sites}, indent=1) + "\n"

    def exists(self) -> bool:
        return os.path.isfile(self.path)

    def remove(self) -> None:
        """Delete the checkpoint (the final report is written); the default folder goes too when it is empty."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        if self.make_folder:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(self.path))
