"""Fairness benchmark: a flooding client and a slow client against the real daemon, in three processes.

The daemon (`otel-evaluator serve`) runs in its own process with a config that sets the in-flight byte budget
(and `receivers.fairness`). Two clients, each in its own process, both over loopback OTLP/gRPC:

- the flood: several threads, each on its own channel (connection), sending raw OTLP protobuf requests of many
  spans as fast as the daemon acknowledges them. Every request has distinct span and trace ids and advancing
  timestamps (resending one payload would measure the dedupe, not the ingest). A refused request (UNAVAILABLE)
  is retried after the RetryInfo delay, as the Collector and the SDKs do.
- the slow client: one channel, one small request (`--slow-spans`, default 10) once a second, as a pipeline
  reporting its runs would. Its ack latency is measured from the first send to the OK, retries included (it
  also retries after RetryInfo); every refusal is counted.

The clients name themselves with the `otel-evaluator-client` metadata (both connect from 127.0.0.1, so their
addresses cannot tell them apart). Each scenario starts a fresh daemon:

- idle: the slow client alone;
- flood: the flood, and after `--warmup` seconds the slow client, for `--seconds`;

each with fairness on and off (`receivers.fairness.enabled`). Prints one JSON report: the slow client's latency
p50/p90/p99/max and refusals, the flood's accepted spans/s and refusals, and the daemon's refusals by reason.

    .venv/bin/python bench/fairness.py                       # both modes, 30 s each, the default budget
    .venv/bin/python bench/fairness.py --fairness off --seconds 15
    .venv/bin/python bench/fairness.py --no-idle --inflight 2911025   # a budget of exactly 5 flood requests
    .venv/bin/python bench/fairness.py --fairness default   # leave receivers.fairness out (code without it)
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import shutil
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.payload import make_request

_MODE_NAMES: dict[bool | None, str] = {True: "on", False: "off", None: "default"}
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
CLIENT_HEADER = "otel-evaluator-client"


class Template:
    """A serialized request plus the byte offsets of every span id, trace id and timestamp in it, so that a
    request with fresh ids costs a copy and a few packs rather than building a protobuf."""

    def __init__(self, spans: int) -> None:
        base_ns = time.time_ns()
        req = make_request(spans, seed=7, now_ns=base_ns)
        items = req.resource_spans[0].scope_spans[0].spans
        for sp in items:
            sp.span_id = os.urandom(8)  # random bytes: each id's offset can be found unambiguously
        self.spans = spans
        self.data = req.SerializeToString()
        self.trace_id = items[0].trace_id
        self.id_offsets = [self._find_one(s.span_id) for s in items]
        self.time_offsets = [(self._find_one(struct.pack("<Q", v)), v)
                             for s in items for v in (s.start_time_unix_nano, s.end_time_unix_nano)]

    def _find_one(self, needle: bytes) -> int:
        first = self.data.find(needle)
        if first < 0 or self.data.find(needle, first + 1) >= 0:
            raise RuntimeError("template value is not unique in the payload")
        return first

    def derive(self, n: int, tag: int) -> bytes:
        """Request number n of the client `tag`: ids unique across clients, span time 1 ms later per request."""
        out = bytearray(self.data.replace(self.trace_id, os.urandom(16)))
        for i, off in enumerate(self.id_offsets):
            struct.pack_into(">Q", out, off, (tag << 56) | (n * self.spans + i + 1))
        for off, value in self.time_offsets:
            struct.pack_into("<Q", out, off, value + n * 1_000_000)
        return bytes(out)


def _retry_delay(err: Any, default: float) -> float:
    from google.rpc import error_details_pb2

    for key, value in err.trailing_metadata() or ():
        if key == "google.rpc.retryinfo-bin":
            info = error_details_pb2.RetryInfo.FromString(value)
            return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return default


def flood_main(endpoint: str, threads: int, spans: int, conn: Any) -> None:
    """Send as fast as acknowledged until told to stop; report accepted spans and refusals."""
    import grpc

    template = Template(spans)
    counter = itertools.count()
    stop = threading.Event()
    lock = threading.Lock()
    stats = {"accepted_requests": 0, "refusals": 0, "errors": 0}
    first_error: list[str] = []

    def worker() -> None:
        options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
        with grpc.insecure_channel(endpoint, options=options) as channel:
            call = channel.unary_unary(EXPORT, request_serializer=None, response_deserializer=None)
            while not stop.is_set():
                payload = template.derive(next(counter), tag=1)
                while not stop.is_set():
                    try:
                        call(payload, timeout=60, metadata=((CLIENT_HEADER, "flood"),))
                        with lock:
                            stats["accepted_requests"] += 1
                        break
                    except grpc.RpcError as err:
                        if err.code() != grpc.StatusCode.UNAVAILABLE:
                            with lock:
                                stats["errors"] += 1
                                first_error[:] = first_error or [f"{err.code()}: {err.details()}"]
                            stop.wait(1.0)
                            break
                        with lock:
                            stats["refusals"] += 1
                        stop.wait(_retry_delay(err, 1.0))

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    conn.send("ready")
    conn.recv()  # go
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    conn.recv()  # stop
    stop.set()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    conn.send({**stats, "elapsed": elapsed, "spans_per_request": spans, "bytes_per_request": len(template.data),
               "first_error": first_error[0] if first_error else None})


def slow_main(endpoint: str, spans: int, seconds: float, period: float, conn: Any) -> None:
    """One small request every `period` seconds for `seconds`; the ack latency of each, retries included."""
    import grpc

    template = Template(spans)
    latencies: list[float] = []
    refusals = [0]
    errors: list[str] = []

    def send(call: Any, payload: bytes) -> bool:
        """Until acknowledged, retrying UNAVAILABLE after RetryInfo; False on another error."""
        while True:
            try:
                call(payload, timeout=30, metadata=((CLIENT_HEADER, "slow"),))
                return True
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    errors.append(f"{err.code()}: {err.details()}")
                    return False
                refusals[0] += 1
                time.sleep(_retry_delay(err, 1.0))

    with grpc.insecure_channel(endpoint) as channel:
        call = channel.unary_unary(EXPORT, request_serializer=None, response_deserializer=None)
        send(call, template.derive(0, tag=2))  # connected, and known to the daemon as a client
        refusals[0] = 0
        conn.send("ready")
        conn.recv()  # go
        start = time.perf_counter()
        for n in itertools.count(1):
            due = start + (n - 1) * period
            if due - start >= seconds:
                break
            time.sleep(max(0.0, due - time.perf_counter()))
            t0 = time.perf_counter()
            if send(call, template.derive(n, tag=2)):
                latencies.append(time.perf_counter() - t0)
    conn.send({"latencies": latencies, "refusals": refusals[0], "errors": errors[:5]})


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _refusals_by_reason(metrics: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("otel_evaluator_requests_refused_total{"):
            labels, value = line.rsplit(" ", 1)
            reason = labels.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = out.get(reason, 0) + float(value)
    return out


def _config(path: Path, fairness: bool | None, args: argparse.Namespace) -> Path:
    """fairness None leaves receivers.fairness out (the daemon's default)."""
    section = "" if fairness is None else f"  fairness:\n    enabled: {'true' if fairness else 'false'}\n"
    store = f"store:\n  max_group_spans: {args.max_group_spans}\n" if args.max_group_spans else ""
    inflight = f"  inflight_bytes: {args.inflight}\n" if args.inflight else ""
    path.write_text(f"{store}receivers:\n{inflight}{section}  grpc:\n    max_workers: {args.workers}\n")
    return path


def _process(target: Any, *args: Any) -> tuple[Any, Any]:
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=target, args=(*args, child))
    proc.start()
    return proc, parent


def _recv(conn: Any, proc: Any, timeout: float = 600.0) -> Any:
    deadline = time.monotonic() + timeout
    while not conn.poll(1.0):
        if not proc.is_alive() or time.monotonic() > deadline:
            raise SystemExit("a client process died or hung; see its traceback above")
    return conn.recv()


def scenario(args: argparse.Namespace, fairness: bool | None, flood: bool, workdir: str) -> dict[str, Any]:
    from evaluator.testing import DaemonProcess

    tag = f"{_MODE_NAMES[fairness]}-{'flood' if flood else 'idle'}"
    config = _config(Path(workdir) / f"{tag}.yaml", fairness, args)
    db = os.path.join(workdir, f"{tag}.duckdb")
    daemon = DaemonProcess(["--db", db, "--config", str(config), "--grpc-listen", "127.0.0.1:0",
                            "--http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]).start()
    try:
        flood_proc = flood_conn = None
        if flood:
            flood_proc, flood_conn = _process(flood_main, daemon.grpc_endpoint, args.flood_threads,
                                              args.flood_spans)
            assert _recv(flood_conn, flood_proc) == "ready"
            flood_conn.send("go")
            time.sleep(args.warmup)
        slow_proc, slow_conn = _process(slow_main, daemon.grpc_endpoint, args.slow_spans, args.seconds, 1.0)
        assert _recv(slow_conn, slow_proc) == "ready"
        slow_conn.send("go")
        slow = _recv(slow_conn, slow_proc)
        slow_proc.join()
        report: dict[str, Any] = {"fairness": _MODE_NAMES[fairness], "flood": flood}
        if flood_conn is not None and flood_proc is not None:
            flood_conn.send("stop")
            result = _recv(flood_conn, flood_proc)
            flood_proc.join()
            report["flood_spans_per_second"] = round(
                result["accepted_requests"] * result["spans_per_request"] / result["elapsed"])
            report["flood_refusals"] = result["refusals"]
            report["flood_errors"] = result["errors"]
            if result["first_error"]:
                report["flood_first_error"] = result["first_error"]
            report["flood_request_bytes"] = result["bytes_per_request"]
        lat = slow["latencies"]
        report.update({
            "slow_requests": len(lat),
            "slow_refusals": slow["refusals"],
            "slow_errors": slow["errors"],
            "slow_p50_ms": None if not lat else round(statistics.median(lat) * 1000, 1),
            "slow_p90_ms": None if not lat else round((_percentile(lat, 0.90) or 0) * 1000, 1),
            "slow_p99_ms": None if not lat else round((_percentile(lat, 0.99) or 0) * 1000, 1),
            "slow_max_ms": None if not lat else round(max(lat) * 1000, 1),
            "refused_by_reason": _refusals_by_reason(daemon.metrics()),
        })
        return report
    finally:
        daemon.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the slow client sends (default 30)")
    parser.add_argument("--warmup", type=float, default=3.0, help="flood alone before the slow client starts")
    parser.add_argument("--fairness", choices=("on", "off", "both", "default"), default="both",
                        help="receivers.fairness.enabled; both: off then on; default: leave the key out")
    parser.add_argument("--no-idle", action="store_true", help="skip the idle (slow client alone) scenarios")
    parser.add_argument("--inflight", help="receivers.inflight_bytes, e.g. 16MiB (default: the daemon's, 128MiB)")
    parser.add_argument("--workers", type=int, default=16, help="receivers.grpc.max_workers (default 16)")
    parser.add_argument("--max-group-spans", type=int, help="store.max_group_spans (default: the daemon's)")
    parser.add_argument("--flood-threads", type=int, default=32, help="flood channels, one thread each (32)")
    parser.add_argument("--flood-spans", type=int, default=2000, help="spans per flood request (2000, ~580 KB)")
    parser.add_argument("--slow-spans", type=int, default=10, help="spans per slow request (10)")
    args = parser.parse_args()

    choices: dict[str, list[bool | None]] = {"on": [True], "off": [False], "both": [False, True], "default": [None]}
    modes = choices[args.fairness]
    workdir = tempfile.mkdtemp(prefix="bench-fairness-")
    reports = []
    try:
        for fairness in modes:
            for flood in ([True] if args.no_idle else [False, True]):
                reports.append(scenario(args, fairness, flood, workdir))
                print(json.dumps(reports[-1]), file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # the DuckDB files of the floods: hundreds of MB
    print(json.dumps({
        "settings": {"seconds": args.seconds, "inflight_bytes": args.inflight, "grpc_max_workers": args.workers,
                     "max_group_spans": args.max_group_spans,
                     "flood_threads": args.flood_threads, "flood_spans_per_request": args.flood_spans,
                     "slow_spans_per_request": args.slow_spans, "cores": os.cpu_count()},
        "scenarios": reports,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
