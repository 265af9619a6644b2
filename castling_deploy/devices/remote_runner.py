"""The on-device runner: load one artifact with its runtime, time it, or compute logits for an .npy of inputs.

SELF-CONTAINED: its text (after fingerprint.py's) is piped to the device python as ``python3 - MODE ARGS``. It
needs numpy plus the artifact's own runtime, nothing from this package; the stdlib only otherwise, in a style
old device pythons accept (3.6: no ``from __future__``, no walrus). It prints one line ``MARKER {json}``; a
handled failure (missing runtime, no space) is a JSON error and exit status 3, so the host can type it.
Every file it creates goes into its own mkdtemp folder, removed in ``finally``. No ``__main__`` block: the host
appends the call to ``main`` after remote_extra.py's text (scripts.py assembles the script).
"""
import argparse
import errno
import faulthandler
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time

MARKER = "@@castling-deploy-result@@"
SEED = 0
if "collect_fingerprint" not in globals():  # imported on the host; on the device fingerprint.py is prepended
    from castling_deploy.devices.fingerprint import collect_fingerprint


class UsageProblem(Exception):
    """The request does not fit the model (shape, batch): the host reports it as bad input (exit 2)."""


class RuntimeMissing(Exception):
    def __init__(self, module, pip):
        Exception.__init__(self, module)
        self.module, self.pip = module, pip


def _numpy():
    try:
        import numpy
        return numpy
    except ImportError:
        raise RuntimeMissing("numpy", "numpy")


def _rss_bytes():
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class RssSampler:
    """Peak resident set size over a block (same method as the host's profiling/latency.py)."""

    def __init__(self, interval_s=0.002):
        self.baseline = _rss_bytes()
        self.peak = self.baseline or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop)
        self._thread.daemon = True
        self.interval_s = interval_s

    def _loop(self):
        while not self._stop.is_set():
            rss = _rss_bytes()
            if rss is not None and rss > self.peak:
                self.peak = rss
            self._stop.wait(self.interval_s)

    def __enter__(self):
        if self.baseline is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        rss = _rss_bytes()
        if rss is not None:
            self.peak = max(self.peak, rss)


class OrtModel:
    kind = "onnx"

    def __init__(self, path, threads):
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeMissing("onnxruntime", "onnxruntime")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name, self.output_name = inp.name, self.session.get_outputs()[0].name
        self.shape = [d if isinstance(d, int) and d > 0 else None for d in inp.shape]
        self.version = ort.__version__
        self.runtime = "onnxruntime"
        self.name = "onnxruntime %s CPUExecutionProvider" % ort.__version__

    def run(self, x):
        np = _numpy()
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        return np.asarray(out[0], dtype=np.float32)


def _dist_version(dist):
    try:
        from importlib import metadata
        return metadata.version(dist)
    except Exception:
        return "unknown"


def load_model(path, threads):
    suffix = os.path.splitext(path.rstrip("/"))[1].lower()
    if suffix == ".onnx":
        return OrtModel(path, threads)
    classes = {".tflite": "LiteModel", ".engine": "TrtModel", ".plan": "TrtModel", ".mlpackage": "CoreMLModel"}
    if suffix in classes:
        extra = globals()  # on the device remote_extra.py is appended to this text; on the host, import it
        if "TrtModel" not in extra:
            from castling_deploy.devices import remote_extra as mod
            extra = vars(mod)
        return extra[classes[suffix]](path, threads)
    raise UsageProblem("unknown artifact type %r" % suffix)


def resolve_shape(model, batch, override):
    if override:
        shape = [int(d) for d in override.split(",")]
        return [batch] + shape[1:]
    dims = list(model.shape)
    if len(dims) != 4 or any(d is None for d in dims[1:]):
        raise UsageProblem("cannot tell the input shape from the model %s; pass shape=(N, C, H, W)" % (dims,))
    return [batch] + [int(d) for d in dims[1:]]


def _stats(np, lat, batch):
    p50, p90, p99 = np.percentile(lat, [50, 90, 99])
    mean = float(lat.mean())
    return {"mean": round(mean, 4), "std": round(float(lat.std(ddof=1)) if len(lat) > 1 else 0.0, 4),
            "p50": round(float(p50), 4), "p90": round(float(p90), 4), "p99": round(float(p99), 4),
            "min": round(float(lat.min()), 4), "max": round(float(lat.max()), 4),
            "throughput_ips": round(1000.0 * batch / mean, 2) if mean > 0 else None}


def _mb(n):
    return None if n is None else round(n / 2.0 ** 20, 1)


def _max_rss():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _random(np, shape):
    if hasattr(np.random, "default_rng"):
        return np.random.default_rng(SEED).standard_normal(tuple(shape), dtype=np.float32)
    return np.random.RandomState(SEED).standard_normal(tuple(shape)).astype(np.float32)


def profile(args):
    np = _numpy()
    with RssSampler() as load_mem:
        t0 = time.perf_counter()
        model = load_model(args.artifact, args.threads)
        load_ms = (time.perf_counter() - t0) * 1000.0
    shape = resolve_shape(model, args.batch, args.shape)
    x = _random(np, shape)
    lat = np.empty(args.runs, dtype=np.float64)
    out = None
    with RssSampler() as run_mem:
        for _ in range(args.warmup):
            out = model.run(x)
        for i in range(args.runs):
            t = time.perf_counter()
            out = model.run(x)
            lat[i] = (time.perf_counter() - t) * 1000.0
    base = load_mem.baseline
    return {
        "runtime": model.name,
        "runtime_info": {"name": model.runtime, "version": model.version},
        "threads": args.threads, "batch": args.batch, "input_shape": shape,
        "output_shape": list(np.asarray(out).shape), "runs": args.runs, "warmup": args.warmup,
        "load_ms": round(load_ms, 3), "latency_ms": _stats(np, lat, args.batch),
        "samples_ms": [round(float(v), 4) for v in lat],
        "memory": {
            "peak_rss_mb": _mb(_max_rss()), "rss_before_load_mb": _mb(base), "rss_after_load_mb": _mb(_rss_bytes()),
            "load_rss_delta_mb": _mb(load_mem.peak - base) if base else None,
            "run_rss_peak_mb": _mb(run_mem.peak) if run_mem.baseline else None,
            "load_and_run_rss_delta_mb": _mb(max(load_mem.peak, run_mem.peak) - base) if base else None,
        },
        "fingerprint": collect_fingerprint(),
    }


def logits(args):
    np = _numpy()
    x = np.load(args.inputs, allow_pickle=False).astype(np.float32)
    model = load_model(args.artifact, args.threads)
    outs = [model.run(np.ascontiguousarray(x[i:i + args.chunk])) for i in range(0, len(x), args.chunk)]
    y = np.concatenate(outs, axis=0).astype(np.float32)
    np.save(args.output, y, allow_pickle=False)
    return {"runtime": model.name, "shape": list(y.shape), "output": args.output}


def _parser():
    ap = argparse.ArgumentParser(prog="castling-deploy-runner")
    sub = ap.add_subparsers(dest="mode")
    p = sub.add_parser("profile")
    p.add_argument("artifact")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--shape", default=None)
    lg = sub.add_parser("logits")
    lg.add_argument("artifact")
    lg.add_argument("inputs")
    lg.add_argument("output")
    lg.add_argument("--threads", type=int, default=None)
    lg.add_argument("--chunk", type=int, default=32)
    return ap


def emit(doc):
    sys.stdout.write("\n" + MARKER + " " + json.dumps(doc) + "\n")
    sys.stdout.flush()


def _arm_deadline(work):
    """Stop a run the host has given up on: SIGALRM reports and exits between inferences; faulthandler's
    watchdog thread ends a run stuck inside a runtime's C code 10 s later."""
    deadline = int(os.environ.get("CASTLING_DEPLOY_DEADLINE", "0") or 0)
    if deadline <= 0 or not hasattr(signal, "alarm"):
        return

    def on_alarm(signum, frame):
        emit({"ok": False, "error": "timeout", "seconds": deadline})
        shutil.rmtree(work, ignore_errors=True)
        os._exit(3)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(deadline)
    faulthandler.dump_traceback_later(deadline + 10, exit=True)


def main(argv):
    args = _parser().parse_args(argv)
    work = tempfile.mkdtemp(prefix="castling-deploy-run.")
    cwd = os.getcwd()
    _arm_deadline(work)
    try:
        # Stray files runtimes write (ORT's $TMPDIR/.ses, profiles, compile caches) land here, removed below.
        os.chdir(work)
        os.environ["TMPDIR"] = tempfile.tempdir = work
        result = profile(args) if args.mode == "profile" else logits(args)
        emit({"ok": True, "result": result})
        return 0
    except RuntimeMissing as exc:
        emit({"ok": False, "error": "runtime_missing", "module": exc.module, "pip": exc.pip})
        return 3
    except UsageProblem as exc:
        emit({"ok": False, "error": "usage", "message": str(exc)[:2000]})
        return 3
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            emit({"ok": False, "error": "no_space", "path": getattr(exc, "filename", None) or work})
            return 3
        emit({"ok": False, "error": "exception", "type": type(exc).__name__, "message": str(exc)[:2000]})
        return 3
    except Exception as exc:
        emit({"ok": False, "error": "exception", "type": type(exc).__name__, "message": str(exc)[:2000]})
        return 3
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)

