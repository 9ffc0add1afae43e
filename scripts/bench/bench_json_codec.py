"""Benchmark: the local API's JSON codec with orjson against the standard library, side by side.

``agent/api/codec`` parses and writes JSON with orjson where it is installed (the ``agent`` extra) and
falls back to the standard library for what orjson refuses or would write differently. This times
``parse_request`` + ``decode_inputs`` (what the server does with a KServe v2 JSON body before inference)
on requests of three sizes, and ``encode_response`` (after it) on outputs of three sizes, with orjson and
with it switched off, interleaved round by round so drift in the machine's speed hits both alike.

    .venv/bin/python scripts/bench/bench_json_codec.py      # about 20 seconds

Results: ``scripts/bench/results/json_codec.{json,md}``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_results

from edgepack.agent.api import codec

RESPONSES = {"logits [1, 10]": (1, 10), "ImageNet logits [1, 1000]": (1, 1000),
             "segmentation [1, 21, 224, 224]": (1, 21, 224, 224)}  # fmt: skip
SIZES = {
    "tiny [1, 16]": (1, 16),
    "MNIST [1, 1, 28, 28]": (1, 1, 28, 28),
    "ResNet input [1, 3, 224, 224]": (1, 3, 224, 224),
}


def body_for(shape: tuple[int, ...]) -> bytes:
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    doc = {"inputs": [{"name": "input", "shape": list(shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    return json.dumps(doc).encode()


def parse_ms(body: bytes, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        codec.decode_inputs(codec.parse_request(body))
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def encode_ms(shape: tuple[int, ...], runs: int) -> tuple[float, int]:
    request = codec.parse_request(b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [0]}]}')
    outputs = {"y": np.random.default_rng(1).normal(size=shape).astype(np.float32)}
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        body = codec.encode_response("m", "1", request, outputs).body
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times), len(body)


def main() -> None:
    fast = codec._orjson
    if fast is None:
        sys.exit("orjson is not installed: pip install 'edgepack[agent]'")
    rows = []
    for label, shape in SIZES.items():
        body = body_for(shape)
        runs = 200 if len(body) < 100_000 else 10
        samples: dict[str, list[float]] = {"stdlib": [], "orjson": []}
        for _ in range(5):  # interleaved rounds
            codec._orjson = None
            samples["stdlib"].append(parse_ms(body, runs))
            codec._orjson = fast
            samples["orjson"].append(parse_ms(body, runs))
        std, orj = min(samples["stdlib"]), min(samples["orjson"])
        rows.append(
            {
                "request": label,
                "body_kb": round(len(body) / 1024, 1),
                "stdlib_ms": round(std, 3),
                "orjson_ms": round(orj, 3),
                "speedup": round(std / orj, 2),
            }
        )
        print(rows[-1], flush=True)
    for label, shape in RESPONSES.items():
        runs = 200 if np.prod(shape) < 100_000 else 5
        timed: dict[str, list[float]] = {"stdlib": [], "orjson": []}
        for _ in range(5):
            codec._orjson = None
            timed["stdlib"].append(encode_ms(shape, runs)[0])
            codec._orjson = fast
            ms, size = encode_ms(shape, runs)
            timed["orjson"].append(ms)
        std, orj = min(timed["stdlib"]), min(timed["orjson"])
        rows.append({"request": f"response: {label}", "body_kb": round(size / 1024, 1), "stdlib_ms": round(std, 3),
                     "orjson_ms": round(orj, 3), "speedup": round(std / orj, 2)})  # fmt: skip
        print(rows[-1], flush=True)
    notes = [
        f"orjson {fast.__version__}; requests: parse_request + decode_inputs of a KServe v2 JSON FP32 request; "
        "responses: encode_response of one FP32 output as JSON; in process",
        "each figure: the lowest of 5 interleaved rounds' medians (200 runs a round; 10 for the largest request, "
        "5 for the largest response)",
    ]
    md = write_results("json_codec", rows, title="Local API: JSON codec, orjson vs the standard library",
                       notes=notes)  # fmt: skip
    print(md.read_text())


if __name__ == "__main__":
    main()
