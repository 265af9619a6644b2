"""`castling-deploy profile`: one artifact on its runtime, or a resolution sweep of a checkpoint."""
from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import click

from ..errors import UsageError
from .app import cli, emit_json, handle_errors, json_option

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
@click.option("--batch", type=int, default=1, show_default=True, help="Batch size.")
@click.option("--chart", type=click.Path(path_type=Path), help="PNG latency chart (default: beside the artifact).")
@click.option("--no-per-op", is_flag=True, help="Skip the per-op breakdown (ORT).")
@click.option("--sweep", help="Comma-separated resolutions: ARTIFACT is then a checkpoint re-exported at each.")
@click.option("--baseline", type=click.Choice(["softmax"]), help="With --sweep: also the softmax-attention baseline.")
@click.option("--arch", help="With --sweep: architecture of a foreign checkpoint, or a registry name with no file.")
@json_option
@handle_errors
def profile(artifact: Path, runs: int, warmup: int, threads: int | None, batch: int, chart: Path | None,
            no_per_op: bool, sweep: str | None, baseline: str | None, arch: str | None, as_json: bool) -> None:
    """Latency of an exported ARTIFACT on its runtime: load time, p50/p90/p99, throughput, memory, per-op."""
    from .. import api
    from ..profiling import format_profile_table

    if runs < 1 or warmup < 0 or batch < 1 or (threads is not None and threads < 1):
        raise UsageError("--runs and --batch must be >= 1, --warmup >= 0, --threads >= 1")
    progress = sys.stderr.isatty()
    if sweep is not None:
        _sweep(artifact, sweep, baseline, arch, runs, warmup, threads, chart, progress, as_json)
        return
    if baseline:
        raise UsageError("--baseline applies to --sweep only")
    chart_path = chart or artifact.with_name(artifact.name + ".latency.png")
    result = api.profile(artifact, runs=runs, warmup=warmup, threads=threads, batch=batch, chart=chart_path,
                         per_op=not no_per_op, progress=progress)
    if "interpreter" in str(result.get("runtime", "")):
        log.warning("%s: timed with the MIL reference interpreter (numpy), not Core ML; this is not the "
                    "latency on an Apple device and is not recorded in report.json", artifact.name)
    emit_json(result) if as_json else click.echo(format_profile_table(result))


def _sweep(artifact: Path, sweep: str, baseline: str | None, arch: str | None, runs: int, warmup: int,
           threads: int | None, chart: Path | None, progress: bool, as_json: bool) -> None:
    from ..profiling import format_sweep_table, profile_sweep

    sizes = _parse_sizes(sweep)
    make_model, make_baseline, name, patch = _sweep_models(artifact, arch)
    bad = [s for s in sizes if s % patch]
    if bad:
        raise UsageError(f"--sweep {sweep}: {bad} not multiples of the patch size {patch}")
    chart_path = chart or Path(f"{name}-sweep.png")
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
