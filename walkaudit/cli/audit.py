"""`walkaudit audit MODEL --data DATA` (or `walkaudit MODEL …`): the audit, its checkpoint, gate and outputs."""

from __future__ import annotations

import json
import sys

import click

from walkaudit._noise.registry import REGISTRY
from walkaudit.cli import options as opt
from walkaudit.cli.app import EXIT_USAGE, GroupedCommand, _err, guarded, main, warn
from walkaudit.cli.reports import check_outputs, emit, read_report
from walkaudit.errors import UsageError, WalkauditError

#: where the data loader looks for labels without --y-key (walkaudit._loading.data)
_LABEL_KEYS = ("y", "Y", "labels", "label", "targets", "target")
_LABEL_LIKE = ("lab", "lbl", "target", "class", "truth", "gt", "ann")


@main.command("audit", cls=GroupedCommand, context_settings={"show_default": True})
@guarded
@click.argument("model", type=click.Path(dir_okay=False))
@opt.DATA
@opt.SITES
@opt.NOISE
@opt.SWEEP
@opt.RUNTIME
@opt.GATE
@opt.OUTPUT(**opt.REPORT_OUTPUT)
@opt.RESUME
def audit_command(model: str, data: opt.Data, sites: opt.Sites, noise: opt.Noise, sweep: opt.Sweep,
                  runtime: opt.Runtime, gate: opt.Gate, output: opt.Output, resume: opt.Resume):
    """Audit MODEL: σ50 of every site, a table, a JSON report and a gate verdict.

    \b
    Examples:
      walkaudit model.onnx --data val.npz --json out/report.json
      walkaudit model.onnx --data val.npz --fail-under 0.05 --baseline base.json --max-drop 20%
      walkaudit model.onnx --data val.npz --ops Conv,Gemm --noise multiplicative --sigmas 1e-3:1e1:21
      walkaudit model.onnx --data val.npz --json report.json --markdown auto --format github -q
      walkaudit model.onnx --data val.npz --json report.json --resume      # after Ctrl-C or a crash

    Exit codes: 0 passed, 1 gate failed or undecided, 2 bad usage or input, 3 runtime failure, 130/143/129
    interrupted by SIGINT/SIGTERM/SIGHUP (a partial report is written; --resume continues).
    """
    from walkaudit import api
    from walkaudit.cli import checkpoint as ckpt
    from walkaudit.cli import outputs, signals
    from walkaudit.cli.progress import RichProgress
    from walkaudit.config import AuditConfig
    from walkaudit.report import gate as gates

    quiet = output.quiet or output.silent
    data_path, checkpoint_path = data.data_path, resume.checkpoint_path
    check_outputs(output, [("the model", model), ("the data (--data)", data_path),
                           ("the baseline (--baseline)", gate.baseline), ("the rules file (--rules)", gate.rules_file)],
                  extra=[("--checkpoint", checkpoint_path)])
    gate_config = gate.config(gate.baseline)
    baseline_report = read_report(gate.baseline) if gate.baseline else None
    if baseline_report is not None and gate_config.max_drop is None:
        warn("--baseline without --max-drop: the baseline is not compared (add e.g. --max-drop 20%)")
    config = AuditConfig(
        **noise.config(), **sweep.config(), **runtime.config(sweep.global_mode),
        chance=data.chance, output=data.output, selection=sites.selection(), limit=data.limit, x_key=data.x_key,
        y_key=data.y_key, allow_nonfinite=data.allow_nonfinite, ignore_label=data.ignore_label, mask=data.mask,
    ).check()

    _check_npz_labels(data_path, data.x_key, data.y_key)

    # The checkpoint: found (and, with --resume, read and checked) before any audit work.
    cp = None
    try:
        fp = ckpt.fingerprint_files(model, data_path, config)
    except OSError:
        fp = None  # a model or data file that cannot be read: the audit itself says so, in its own words
    if fp is not None:
        path = checkpoint_path or ckpt.default_path(output.json, fp)
        to_write = [(flag, o.path) for flag, value in output.files for o in [outputs.resolve(flag, value)]
                    if o is not None]
        exists = ckpt.check_path(path, to_write, inputs=[("the model", model), ("the data (--data)", data_path)])
        ckpt.clean_stale(path)  # the temporary of a write killed with -9
        if resume.resume and not exists:  # e.g. killed before the first site finished: nothing saved yet
            warn(f"--resume: no checkpoint at {path} yet; starting from the beginning")
        done = ckpt.load(path, fp) if resume.resume and exists else []
        if not resume.resume and exists:
            warn(f"starting over: the checkpoint {path} of an earlier run is replaced (--resume continues it)")
        cp = ckpt.Checkpoint(path, fp, done, make_folder=checkpoint_path is None and output.json in (None, "-"))

    executor = None
    if runtime.ray_address is not None:  # connected before any audit work: a request the cluster cannot meet fails
        from walkaudit._execution import ray_executor

        executor = ray_executor.connect(None if runtime.ray_address == "local" else runtime.ray_address, config)
    partial, signum = False, None
    with signals.Trap() as trap:
        with RichProgress(disable=quiet, level=REGISTRY[config.noise].level) as progress:
            run = api.iter_audit(model, data=data_path, config=config, progress=progress,
                                 done=cp.sites if cp else (), executor=executor,
                                 data_sha256=fp["data_sha256"] if fp else None)  # hashed once, above
            if cp is not None and json.dumps(run.fingerprint, sort_keys=True) != json.dumps(fp, sort_keys=True):
                raise UsageError("the model or data file changed while the audit started; run it again")
            _warn_range(run)
            if cp is not None and cp.sites:
                ckpt.check_against(cp.sites, run.sites, None if run.loaded.class_output.per_token
                                   else run.dataset.samples)
            if gate_config.thresholds and not gate.allow_unmatched and config.shard is None:  # before any work
                gates.check_matched(gate_config, ["global"] if sweep.global_mode else [s.name for s in run.sites])
            try:
                for site in run:
                    problem = cp.add(site.to_dict()) if cp else None
                    if problem:
                        warn(f"{problem}; the audit goes on without a checkpoint")
            except KeyboardInterrupt as exc:
                trap.hold()  # a second Ctrl-C must not cut the partial report short
                try:
                    result = run.report(partial=True)
                except WalkauditError:
                    raise exc from None  # stopped before the clean pass ended: nothing to report
                partial, signum = True, signals.signum_of(exc)
            else:
                result = run.report(partial=False)
        verdict = gates.evaluate(result, gate_config, baseline_report, **gate.policy)
        report = result.with_gate(verdict, rules=gate_config.to_dict())
        emit(report, output)
    log = outputs.current_log()
    failed, written = list(log.failed), list(log.written)
    log.failed.clear()  # said here, not again by guarded
    if partial:
        where = ", ".join("stdout" if p == "-" else p for p in written)
        message = f"interrupted ({signals.signal_name(signum)}); " + (
            f"partial report written to {where}" if where else
            "no report written (no --json, --markdown or --junit)" if quiet else "partial results above")
        if failed:
            message += f"; {outputs.failure_message(failed)}"
        if cp is not None and cp.sites and not cp.broken:
            message += "; rerun with --resume to continue"
        _err(message)
        sys.exit(signals.exit_code(signum))
    if failed:
        _err(outputs.failure_message(failed))  # the checkpoint stays: --resume writes the report again at once
        sys.exit(EXIT_USAGE)
    if cp is not None:
        cp.remove()
    sys.exit(verdict.exit_code)


def _warn_range(run) -> None:
    """Warn when the data looks unnormalised (walkaudit._loading.data.range_warning: whole-number floats above 50)."""
    from walkaudit._loading.data import range_warning

    dataset = getattr(run, "dataset", None)
    message = range_warning(dataset) if dataset is not None else None
    if message:
        warn(message)


def _check_npz_labels(data_path: str | None, x_key: str | None, y_key: str | None) -> None:
    """Warn when an .npz holds an array that looks like labels but will not be used as such (no --y-key and none of
    the names the loader knows): the audit would silently measure agreement with the clean model. Only the member
    names are read (zipfile), never an array."""
    import zipfile

    if y_key is not None or data_path is None or not str(data_path).lower().endswith(".npz"):
        return
    try:
        with zipfile.ZipFile(data_path) as archive:
            keys = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
    except (OSError, zipfile.BadZipFile, ValueError):
        return  # the loader says what is wrong with the file
    if any(k in _LABEL_KEYS for k in keys):
        return
    unused = [k for k in keys if k != x_key]
    likely = [k for k in unused if k.lower() in ("y", "t") or any(w in k.lower() for w in _LABEL_LIKE)]
    if likely:
        names = ", ".join(repr(k) for k in likely)
        warn(f"{data_path} has no labels under {', '.join(_LABEL_KEYS)}, so accuracy means agreement with the clean "
             f"model; {names} look{'s' if len(likely) == 1 else ''} like labels: pass --y-key {likely[0]} to use "
             "them")
