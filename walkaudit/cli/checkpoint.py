"""Resumable audits: the finished sites, saved after each one, and what they were made from.

A checkpoint is a JSON file, replaced atomically after every finished site:

    {"format": "walkaudit.checkpoint/1", "fingerprint": {...}, "sites": [site dicts in the report's schema]}

The fingerprint holds the model's and the data's sha256 and every setting that changes the numbers (noise, ratio,
mode, sigmas, repeats, seed, site selection, limit, chance, output, noise source, exact, data keys, non-finite
policy; `AuditConfig.fingerprint()`), but not batch size, threads or provider. `--resume` reuses the sites only when the fingerprint is the same;
otherwise it refuses with one line that names what differs.

Where: `--checkpoint PATH`; else `<--json PATH>.checkpoint` when --json is a file; else
`.walkaudit/checkpoint-<12 hex>.json` in the current folder (12 hex digits of the fingerprint's sha256).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

from walkaudit.cli.outputs import write_atomic
from walkaudit.errors import UsageError

FORMAT = "walkaudit.checkpoint/1"
FOLDER = ".walkaudit"
SUFFIX = ".checkpoint"

# fingerprint key -> how the user sets it (for the one-line refusal)
FLAGS = {
    "noise": "--noise", "ratio": "--ratio", "bits": "--bits", "target": "--target", "mode": "--global", "sigmas": "--sigmas", "repeats": "--repeats",
    "seed": "--seed", "selection": "--ops/--include/--exclude/--site", "limit": "--limit", "chance": "--chance",
    "output": "--output", "noise_source": "--noise-source", "exact": "--exact", "x_key": "--x-key",
    "y_key": "--y-key", "allow_nonfinite": "--allow-nonfinite",
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


def load(path: str, fp: dict) -> list[dict]:
    """The finished sites of the checkpoint at `path`, made by an audit with this fingerprint.

    Refuses with a one-line UsageError (exit 2): no checkpoint, not a checkpoint, or made for another audit.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UsageError(f"--resume: no checkpoint at {path} (nothing to resume; run without --resume)") from None
    except IsADirectoryError:
        raise UsageError(f"--resume: {path} is a directory, not a checkpoint") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--resume: cannot read the checkpoint {path}: {getattr(exc, 'strerror', None) or exc}") \
            from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--resume: {path} is not a walkaudit checkpoint (corrupt JSON: {exc})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        found = body.get("format") if isinstance(body, dict) else type(body).__name__
        raise UsageError(f"--resume: {path} is not a walkaudit checkpoint (format {found!r}, expected {FORMAT})")
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
    return sites


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
            write_atomic(self.path, self.dumps())
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
