"""The click group, logging, the one JSON emitter, error-to-exit-code mapping, and the shared option decorators.

Exit codes: 0 ok; 2 usage / bad input; 3 a tolerance goal failed (report still written); 4 an optional runtime
missing; 1 anything else. Logs go to stderr; --json prints one document on stdout.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click

from .. import __version__
from ..errors import CastlingError

log = logging.getLogger("castling_deploy")

# The shipped demo lives in the repository, not in the library: only the CLI knows the repo layout.
REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CHECKPOINT = REPO_ROOT / "models" / "castling_nano_digits.pt"
DEMO_CALIB = REPO_ROOT / "calib" / "digits" / "train"
DEMO_VAL = REPO_ROOT / "calib" / "digits" / "val"


def setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("castling_deploy")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def emit_json(data: Any) -> None:
    """The one JSON document a --json command prints on stdout (strict JSON: no NaN/Infinity)."""
    from ..output import to_jsonable

    click.echo(json.dumps(to_jsonable(data), indent=2))


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Map our errors to exit codes with one line on stderr; no traceback unless CASTLING_DEBUG=1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..output import command_temp_root

        try:
            with command_temp_root():  # every temp file of the command, ours or a library's, lives and dies here
                return func(*args, **kwargs)
        except CastlingError as exc:
            if os.environ.get("CASTLING_DEBUG"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing half-written was left behind", err=True)
            sys.exit(130)
        except Exception as exc:  # a bug or an unforeseen failure: still one line, exit 1
            if os.environ.get("CASTLING_DEBUG"):
                raise
            first = str(exc).splitlines()[0][:300] if str(exc) else ""
            click.echo(f"error: {type(exc).__name__}: {first} (set CASTLING_DEBUG=1 for a traceback)", err=True)
            sys.exit(1)

    return wrapper


def json_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")(func)


def tolerance_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--tolerance", type=float, default=0.5, show_default=True, help=help_text)


def val_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--limit", type=int, help="At most N val images (seeded sample).")(func)
    return click.option("--val", type=click.Path(path_type=Path),
                        help="Validation images (class subfolders give labels) to measure accuracy on.")(func)


def device_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--device URI (repeatable), --device-python, --ssh-config, --benchmark-model: where a command runs."""
    func = click.option("--benchmark-model", type=click.Path(path_type=Path),
                        help="adb devices: LiteRT's benchmark_model binary for the phone's ABI (pushed to "
                             "/data/local/tmp).")(func)
    func = click.option("--ssh-config", type=click.Path(path_type=Path),
                        help="OpenSSH client config passed as `ssh -F` (default: your ~/.ssh/config; also "
                             "$CASTLING_DEPLOY_SSH_CONFIG).")(func)
    func = click.option("--device-python", help="Interpreter on an SSH device (default: python3).")(func)
    return click.option("--device", "devices", multiple=True, metavar="URI",
                        help="Run on a device: ssh://[user@]host[:port], adb:SERIAL (adb: = the only one), or "
                             "local. Repeat for a fleet (run concurrently).")(func)


def verbose_flag() -> bool:
    return bool((click.get_current_context().find_root().obj or {}).get("verbose"))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="castling-deploy")
@click.option("-v", "--verbose", is_flag=True, help="More log output on stderr, including the converters' own.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Fold, export, quantize and verify Castling-ViT checkpoints for TensorRT, Core ML and LiteRT.

    \b
    Typical use:
      castling-deploy export                     # the shipped demo, ONNX, verified on its val set
      castling-deploy export CKPT --target tensorrt --int8 --calib DIR --val DIR
      castling-deploy profile exports/<model>/onnx/model.onnx
      castling-deploy package exports/<model> -o model.zip
    \b
    Exit codes: 0 ok, 2 bad input, 3 a tolerance goal failed (report written, marked failed),
    4 an optional runtime is missing, 1 anything else.
    """
    setup_logging(verbose)
    ctx.obj = {"verbose": verbose}
