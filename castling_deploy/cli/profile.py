"""`castling-deploy profile`: one artifact on its runtime, or a resolution sweep of a checkpoint."""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import click

from ..errors import UsageError
from .app import cli, device_options, emit_json, handle_errors, json_option

log = logging.getLogger(__name__)


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--sweep {text!r}: expected comma-separated resolutions like 224,384,512") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise UsageError(f"--sweep {text!r}: expected positive resolutions like 224,384,512")
    return sizes


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--runs", type=int, default=100, show_default=True, help="Timed runs.")
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed warm-up runs.")
@click.option("--threads", type=int, help="Intra-op threads (default: the runtime's).")
@click.option("--batch", type=int, help="Batch size, 1..1024 (default: N of --shape, else 1).")
@click.option("--shape", help="Input shape N,C,H,W, for models whose H, W (or C) are dynamic; the latency is then "
                              "not recorded in report.json.")
@click.option("--chart", type=click.Path(path_type=Path),
              help="PNG latency chart (default: beside the artifact, when that folder is writable).")
@click.option("--no-per-op", is_flag=True, help="Skip the per-op breakdown (ORT).")
@click.option("--sweep", help="Comma-separated resolutions: ARTIFACT is then a checkpoint re-exported at each.")
@click.option("--baseline", type=click.Choice(["softmax"]), help="With --sweep: also the softmax-attention baseline.")
@click.option("--arch", help="With --sweep: architecture of a foreign checkpoint, or a registry name with no file.")
@device_options
@json_option
@handle_errors
def profile(artifact: Path, runs: int, warmup: int, threads: int | None, batch: int | None, shape: str | None,
            chart: Path | None, no_per_op: bool, sweep: str | None, baseline: str | None, arch: str | None,
            devices: tuple[str, ...], device_python: str | None, ssh_config: Path | None,
            benchmark_model: Path | None, as_json: bool) -> None:
    """Latency of an exported ARTIFACT on its runtime: load time, p50/p90/p99, throughput, memory, per-op.

    \b
    With --device URI (repeatable: a fleet runs concurrently) it runs where you deploy instead:
      ssh://[user@]host[:port]  any machine your OpenSSH setup reaches (aliases, keys, agents, jump hosts);
                                the artifact is pushed once, by content hash, to ~/.cache/castling-deploy/
                                artifacts/<sha256>/ there and run by a self-contained script on --device-python
      adb:SERIAL (adb: = the only phone)  LiteRT's benchmark_model (--benchmark-model PATH), pushed to
                                /data/local/tmp/castling-deploy/
      local                     this machine through the same code path
    Each result carries the device's fingerprint and is appended to the report.json beside the artifact.
    """
    from ..profiling import format_profile_table, profile_artifact
    from ..profiling.latency import MAX_BATCH, check_chart_destination, check_input_shape
    from ..report import record_latency

    input_shape = _parse_shape(shape) if shape is not None else None
    if batch is None:
        batch = input_shape[0] if input_shape else 1
    elif input_shape and input_shape[0] != batch:
        raise UsageError(f"--batch {batch} contradicts --shape {shape}; give one of them")
    if runs < 1 or warmup < 0 or batch < 1 or (threads is not None and threads < 1):
        raise UsageError("--runs and --batch must be >= 1, --warmup >= 0, --threads >= 1")
    if batch > MAX_BATCH:
        raise UsageError(f"--batch {batch}: at most {MAX_BATCH} images per batch can be profiled")
    progress = sys.stderr.isatty()
    if devices:
        if sweep is not None or chart is not None:
            raise UsageError("--device profiles one artifact on its devices; drop --sweep / --chart")
        _on_devices(artifact, devices, device_python, ssh_config, benchmark_model, runs=runs, warmup=warmup,
                    threads=threads, batch=batch, shape=input_shape, as_json=as_json)
        return
    if sweep is not None:
        if shape is not None:
            raise UsageError("--shape applies to a single artifact; --sweep takes its sizes from --sweep")
        _sweep(artifact, sweep, baseline, arch, runs, warmup, threads, chart, progress, as_json)
        return
    if baseline:
        raise UsageError("--baseline applies to --sweep only")
    if input_shape:
        check_input_shape(input_shape)
    if chart is not None:
        check_chart_destination(chart)  # before anything is measured
    chart_path = chart or (_default_chart(artifact) if artifact.exists() else None)
    report = artifact.parent / "report.json"
    record = shape is None and (not report.is_file() or os.access(report.parent, os.W_OK | os.X_OK))
    if shape is None and not record:
        log.warning("%s: not writable; the latency is not recorded there", report)
    result = profile_artifact(artifact, runs=runs, warmup=warmup, threads=threads, batch=batch,
                              chart_path=chart_path, per_op=not no_per_op, progress=progress,
                              input_shape=input_shape)
    if record and "interpreter" not in str(result.get("runtime", "")):
        record_latency(artifact, result)
    if "interpreter" in str(result.get("runtime", "")):
        log.warning("%s: timed with the MIL reference interpreter (numpy), not Core ML; this is not the "
                    "latency on an Apple device and is not recorded in report.json", artifact.name)
    emit_json(result) if as_json else click.echo(format_profile_table(result))


def _on_devices(artifact: Path, devices: tuple[str, ...], python: str | None, ssh_config: Path | None,
                benchmark_model: Path | None, *, as_json: bool, **kw: Any) -> None:
    """One side-by-side table (or one JSON document) for the fleet; the worst device's exit code."""
    from .. import api
    from ..devices import fleet_exit_code
    from ..devices.fleet import format_fleet_table

    results = api.profile_on_devices(artifact, devices, python=python, ssh_config=ssh_config,
                                     benchmark_model=benchmark_model, record=kw["shape"] is None, **kw)
    if as_json:
        emit_json({"artifact": str(artifact), "devices": [
            {"uri": r.uri, "ok": r.ok, "exit_code": r.exit_code, "error": r.error, "result": r.result,
             "seconds": round(r.seconds, 2)} for r in results]})
    else:
        click.echo(format_fleet_table(results))
    code = fleet_exit_code(results)
    if code:
        failed = [r for r in results if not r.ok]
        click.echo(f"error: {len(failed)} of {len(results)} devices failed: " + "; ".join(
            str(r.error) for r in failed), err=True)
        sys.exit(code)


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(f"--shape {text!r}: expected N,C,H,W such as 1,3,224,224") from None
    if len(dims) != 4 or min(dims) < 1:
        raise UsageError(f"--shape {text!r}: expected 4 positive integers N,C,H,W such as 1,3,224,224")
    return dims


def _default_chart(artifact: Path) -> Path | None:
    """Beside the artifact when that folder is writable and matplotlib is installed; otherwise no chart."""
    from ..errors import MissingDependencyError
    from ..profiling.latency import check_chart_destination

    path = artifact.with_name(artifact.name + ".latency.png")
    try:
        return check_chart_destination(path)
    except (UsageError, MissingDependencyError) as exc:
        log.warning("no latency chart: %s (pass --chart to choose where)", exc)
        return None


def _sweep(artifact: Path, sweep: str, baseline: str | None, arch: str | None, runs: int, warmup: int,
           threads: int | None, chart: Path | None, progress: bool, as_json: bool) -> None:
    from ..profiling import format_sweep_table, profile_sweep

    sizes = _parse_sizes(sweep)
    make_model, make_baseline, name, patch = _sweep_models(artifact, arch)
    bad = [s for s in sizes if s % patch]
    if bad:
        raise UsageError(f"--sweep {sweep}: {bad} not multiples of the patch size {patch}")
    chart_path = chart or Path(f"{name}-sweep.png")
    from ..profiling.latency import check_chart_destination

    check_chart_destination(chart_path)  # before anything is measured
    with tempfile.TemporaryDirectory(prefix="castling-sweep-") as tmp:
        result = profile_sweep(make_model, sizes, baseline=make_baseline if baseline else None, runs=runs,
                               warmup=warmup, threads=threads or 1, workdir=Path(tmp), chart_path=chart_path,
                               progress=progress)
    if as_json:
        emit_json(result)
    else:
        click.echo(format_sweep_table(result))
        click.echo(f"chart: {chart_path}")


def _sweep_models(artifact: Path, arch: str | None) -> tuple[Callable[[int], Any], Callable[[int], Any], str, int]:
    """Model factories per resolution: a checkpoint (folded, pos-embed resampled) or a bare registry name."""
    from ..fold import fold_softmax_branch
    from ..models.checkpoint import load_checkpoint
    from ..models.registry import VARIANTS, create_model
    from ..models.vit import CastlingViT

    if not artifact.exists() and str(artifact) in VARIANTS:
        name = str(artifact)
        return (lambda s: create_model(name, img_size=s, form="deploy").eval(),
                lambda s: create_model(name, img_size=s, attention="softmax").eval(), name,
                VARIANTS[name][0].patch_size)
    ck = load_checkpoint(artifact, arch=arch)

    def folded(size: int) -> Any:
        model = ck.build_model(img_size=size)
        return fold_softmax_branch(model) if model.cfg.attention == "castling" else model

    def softmax(size: int) -> Any:
        m = CastlingViT(ck.config.with_(img_size=size, attention="softmax", form="deploy"))
        sd = {k: v for k, v in ck.state_dict.items() if ".attn.dconv." not in k and k != "pos_embed"}
        m.load_state_dict(sd, strict=False)  # same weights where they exist; timing does not depend on values
        return m.eval()

    return folded, softmax, ck.name, ck.config.patch_size
