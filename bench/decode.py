"""Decode benchmark: serialized ExportTraceServiceRequest -> SpanColumns (Arrow tables), reference vs C decoder.

    .venv/bin/python bench/decode.py [--requests 50] [--spans 1000] [--repeats 5]

Times bytes -> Decoded (the SpanColumns the store writer inserts, plus counts) end to end on the same payloads
(bench/payload.py, 8 attributes per span) with
  python: ExportTraceServiceRequest.FromString + decode_request + columns_from_batch (decode_bytes_python)
  c:      fastdecode.decode_bytes (the _fastdecode extension fills the Arrow buffers; wrapped without a copy)
and prints the median over the repeats of process CPU time per span, and the ratio. The C line is also split
into the extension call alone and the Arrow wrapping.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from payload import make_request

from evaluator.receiver import fastdecode
from evaluator.receiver.columns import Decoded

PREFIXES = ("data.", "ml.")


def per_span_us(fn: Callable[[bytes, tuple[str, ...]], Any], payloads: list[bytes], spans: int,
                repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        for data in payloads:
            fn(data, PREFIXES)
        times.append(time.process_time() - t0)
    return statistics.median(times) / (len(payloads) * spans) * 1e6


def same(a: Decoded, b: Decoded) -> bool:
    return (a.received, a.dropped, a.rejected, a.reasons) == (b.received, b.dropped, b.rejected, b.reasons) and all(
        getattr(a.columns, t).equals(getattr(b.columns, t)) for t in ("spans", "numbers", "strings", "arrays"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--spans", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    payloads = [make_request(args.spans, seed).SerializeToString() for seed in range(args.requests)]
    size = sum(map(len, payloads)) / len(payloads)
    print(f"{args.requests} requests x {args.spans} spans (8 attributes each), {size / 1024:.0f} KiB per request, "
          f"bytes -> SpanColumns, median of {args.repeats}, process CPU time")

    py = per_span_us(fastdecode.decode_bytes_python, payloads, args.spans, args.repeats)
    print(f"  python (upb + decode_request + columns_from_batch): {py:7.3f} us/span")
    if not fastdecode.ACCELERATED:
        print("  c: the _fastdecode extension is not built; decode_bytes uses the python path")
        return
    for data in payloads[:3]:
        if not same(fastdecode.decode_bytes(data, PREFIXES), fastdecode.decode_bytes_python(data, PREFIXES)):
            raise SystemExit("the C decoder's result differs from the reference")
    c = per_span_us(fastdecode.decode_bytes, payloads, args.spans, args.repeats)
    ext = fastdecode._c

    def c_buffers(data: bytes, prefixes: tuple[str, ...]) -> Any:
        return ext.decode(data, prefixes, fastdecode._resource_from_bytes, fastdecode._value_from_bytes)

    raw = per_span_us(c_buffers, payloads, args.spans, args.repeats)
    print(f"  c      (_fastdecode + Arrow wrapping):             {c:7.3f} us/span")
    print(f"         of which the extension call (buffers):      {raw:7.3f} us/span")
    print(f"  ratio  python / c:                                 {py / c:7.1f}x")


if __name__ == "__main__":
    main()
