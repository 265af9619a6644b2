"""The parser for LiteRT/TFLite ``benchmark_model`` output, against output real runs printed.

Sources (excerpts quoted as test data, trimmed to the parsed lines plus a few table rows):
- MOBILENET_OP_PROFILE: github.com/NobuoTsukamoto/meta-tensorflow-lite, doc/tensorflow-lite-benchmark.md
  (``benchmark_model --graph=mobilenet_v1_1.0_224.tflite --num_threads=4 --enable_op_profiling=true`` on
  qemuriscv64): scientific-notation averages, the "Memory footprint delta" wording, both op-profile sections.
- YOLO_PEAK_MEMORY: github.com/lp6m/yolov5s_android, benchmark/README.md (Xiaomi Mi11, TensorFlow v2.4.0
  benchmark_model, ``adb shell /data/local/tmp/benchmark_model --graph=... --num_threads=4``): the
  "Peak memory footprint (MB): init=.. overall=.." wording.
- YOLO_NNAPI_OPS: same file, the ``--enable_op_profiling=true`` NNAPI run (delegate rows in the summary).
- The print statements themselves: tensorflow/lite/tools/benchmark/benchmark_model.cc (``Inference timings in
  us: Init: ..., First inference: ..., Warmup (avg): ..., Inference (avg): ...``).
The ``INFO:``-prefixed variant newer builds print (with p5/median/p95) is the mobilenet text re-prefixed and
extended by us, marked as such.
"""
from __future__ import annotations

import pytest

from castling_deploy.devices.benchmark_model import parse_benchmark_output, to_profile_keys

MOBILENET_OP_PROFILE = """\
STARTING!
Log parameter values verbosely: [0]
Num threads: [4]
Graph: [./mobilenet_v1_1.0_224.tflite]
Enable op profiling: [1]
#threads used for CPU inference: [4]
Loaded model ./mobilenet_v1_1.0_224.tflite
The input model file size (MB): 16.9008
Initialized session in 17.187ms.
Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.
count=1 curr=3512391

Running benchmark for at least 50 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
count=50 first=2990275 curr=2913402 min=2727568 max=3189954 avg=2.95034e+06 std=109798

Inference timings in us: Init: 17187, First inference: 3512391, Warmup (avg): 3.51239e+06, Inference (avg): 2.95034e+06
Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to the actual memory footprint of the model at runtime. Take the information at your discretion.
Memory footprint delta from the start of the tool (MB): init=4.21094 overall=46.0859
Profiling Info for Benchmark Initialization:
============================== Run Order ==============================
\t             [node type]\t          [start]\t  [first]\t [avg ms]\t     [%]\t  [cdf%]\t  [mem KB]\t[times called]\t[Name]
\t         AllocateTensors\t            0.000\t    1.356\t    1.356\t100.000%\t100.000%\t     0.000\t        1\tAllocateTensors/0

Number of nodes executed: 1
============================== Summary by node type ==============================
\t             [Node type]\t  [count]\t  [avg ms]\t    [avg %]\t    [cdf %]\t  [mem KB]\t[times called]
\t         AllocateTensors\t        1\t     1.356\t   100.000%\t   100.000%\t     0.000\t        1

Timings (microseconds): count=1 curr=1356
Memory (bytes): count=0
1 nodes observed



Operator-wise Profiling Info for Regular Benchmark Runs:
============================== Run Order ==============================
\t             [node type]\t          [start]\t  [first]\t [avg ms]\t     [%]\t  [cdf%]\t  [mem KB]\t[times called]\t[Name]
\t                 CONV_2D\t            0.066\t   87.754\t   60.957\t  2.066%\t  2.066%\t     0.000\t        1\t[MobilenetV1/MobilenetV1/Conv2d_0/Relu6]:0
\t       DEPTHWISE_CONV_2D\t           61.033\t   53.628\t   49.870\t  1.691%\t  3.757%\t     0.000\t        1\t[MobilenetV1/MobilenetV1/Conv2d_1_depthwise/Relu6]:1

Number of nodes executed: 31
============================== Summary by node type ==============================
\t             [Node type]\t  [count]\t  [avg ms]\t    [avg %]\t    [cdf %]\t  [mem KB]\t[times called]
\t                 CONV_2D\t       15\t  2651.853\t    89.897%\t    89.897%\t     0.000\t       15
\t       DEPTHWISE_CONV_2D\t       13\t   296.919\t    10.065%\t    99.962%\t     0.000\t       13
\t         AVERAGE_POOL_2D\t        1\t     0.869\t     0.029%\t    99.992%\t     0.000\t        1
\t                 SOFTMAX\t        1\t     0.232\t     0.008%\t    99.999%\t     0.000\t        1
\t                 SQUEEZE\t        1\t     0.016\t     0.001%\t   100.000%\t     0.000\t        1

Timings (microseconds): count=50 first=2989660 curr=2912978 min=2727203 max=3189476 avg=2.9499e+06 std=109770
Memory (bytes): count=0
31 nodes observed
"""

YOLO_PEAK_MEMORY = """\
count=50 first=249042 curr=250889 min=247067 max=254474 avg=249684 std=1442
Inference timings in us: Init: 16242, First inference: 360262, Warmup (avg): 304586, Inference (avg): 249684
Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to the actual memory footprint of the model at runtime. Take the information at your discretion.
Peak memory footprint (MB): init=4.92969 overall=138.809
"""

YOLO_NNAPI_OPS = """\
Operator-wise Profiling Info for Regular Benchmark Runs:
============================== Run Order ==============================
\t             [node type]\t          [start]\t  [first]\t [avg ms]\t     [%]\t  [cdf%]\t  [mem KB]\t[times called]\t[Name]
\t           STRIDED_SLICE\t            0.021\t    2.167\t    2.118\t  1.335%\t  1.335%\t     0.000\t        1\t[model/tf.strided_slice/StridedSlice]:0

Number of nodes executed: 11
============================== Summary by node type ==============================
\t             [Node type]\t  [count]\t  [avg ms]\t    [avg %]\t    [cdf %]\t  [mem KB]\t[times called]
\t     TfLiteNnapiDelegate\t        3\t   149.483\t    94.187%\t    94.187%\t     0.000\t        3
\t           STRIDED_SLICE\t        6\t     8.347\t     5.259%\t    99.446%\t     0.000\t        6
\t RESIZE_NEAREST_NEIGHBOR\t        2\t     0.879\t     0.554%\t   100.000%\t     0.000\t        2

Timings (microseconds): count=50 first=164033 curr=158560 min=146535 max=166638 avg=158715 std=2931
"""


def test_mobilenet_op_profile() -> None:
    p = parse_benchmark_output(MOBILENET_OP_PROFILE)
    assert (p["init_us"], p["first_inference_us"]) == (17187.0, 3512391.0)
    assert p["warmup_avg_us"] == pytest.approx(3.51239e6) and p["inference_avg_us"] == pytest.approx(2.95034e6)
    assert p["warmup"] == {"count": 1.0, "curr": 3512391.0}
    assert p["regular"] == {"count": 50.0, "first": 2990275.0, "curr": 2913402.0, "min": 2727568.0,
                            "max": 3189954.0, "avg": 2.95034e6, "std": 109798.0}
    assert (p["memory_kind"], p["memory_init_mb"], p["memory_overall_mb"]) == ("delta", 4.21094, 46.0859)
    # the regular-runs summary, not the initialization one (AllocateTensors)
    assert [r["node_type"] for r in p["ops_by_type"]] == ["CONV_2D", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D",
                                                          "SOFTMAX", "SQUEEZE"]
    assert p["ops_by_type"][0] == {"node_type": "CONV_2D", "count": 15, "avg_ms": 2651.853, "percent": 89.897,
                                   "cdf_percent": 89.897, "mem_kb": 0.0, "times_called": 15}
    keys = to_profile_keys(p)
    assert keys["runs"] == 50 and keys["warmup"] == 1 and keys["load_ms"] == pytest.approx(17.187)
    lat = keys["latency_ms"]
    assert lat["mean"] == pytest.approx(2950.34) and lat["min"] == pytest.approx(2727.568)
    assert lat["p50"] is None and lat["throughput_ips"] == pytest.approx(1000 / 2950.34, abs=0.01)
    assert keys["memory"]["peak_rss_mb"] is None  # a delta is not a peak
    assert keys["per_op"]["by_op_type"][1] == {"op_type": "DEPTHWISE_CONV_2D", "ms_per_run": 296.919,
                                               "percent": 10.065, "nodes": 13}


def test_yolo_peak_memory() -> None:
    p = parse_benchmark_output(YOLO_PEAK_MEMORY)
    assert p["inference_avg_us"] == 249684.0 and p["warmup"] is None and p["regular"]["std"] == 1442.0
    assert (p["memory_kind"], p["memory_init_mb"], p["memory_overall_mb"]) == ("peak", 4.92969, 138.809)
    keys = to_profile_keys(p, batch=1)
    assert keys["memory"]["peak_rss_mb"] == 138.809 and keys["latency_ms"]["std"] == pytest.approx(1.442)
    assert keys["per_op"] is None and p["ops_by_type"] == []


def test_delegate_rows() -> None:
    p = parse_benchmark_output(YOLO_NNAPI_OPS)
    assert [(r["node_type"], r["count"], r["avg_ms"]) for r in p["ops_by_type"]] == [
        ("TfLiteNnapiDelegate", 3, 149.483), ("STRIDED_SLICE", 6, 8.347), ("RESIZE_NEAREST_NEIGHBOR", 2, 0.879)]
    assert p["regular"] is None  # the op profiler's own "Timings (microseconds): count=" line is not a run


def test_info_prefixed_newer_format() -> None:
    """Ours: the mobilenet lines as newer builds print them (``INFO: `` prefix, p5/median/p95 on count lines,
    the periodic peak-memory line of --report_peak_memory_footprint)."""
    text = "\n".join("INFO: " + ln for ln in MOBILENET_OP_PROFILE.splitlines())
    text = text.replace("std=109798", "std=109798 p5=2750000 median=2940000 p95=3150000")
    text += "\nINFO: Overall peak memory footprint (MB) via periodic monitoring: 51.25\n"
    p = parse_benchmark_output(text)
    assert p["regular"]["median"] == 2940000.0 and p["init_us"] == 17187.0
    assert [r["node_type"] for r in p["ops_by_type"]][:2] == ["CONV_2D", "DEPTHWISE_CONV_2D"]
    keys = to_profile_keys(p)
    assert keys["latency_ms"]["p50"] == pytest.approx(2940.0) and keys["memory"]["peak_rss_mb"] == 51.25


def test_no_timings_is_an_error() -> None:
    with pytest.raises(ValueError):
        to_profile_keys(parse_benchmark_output("Benchmarking failed.\n"))
