"""Ingest benchmark: a separate client process sends pre-built 1000-span requests (8 attributes each, mixed types)
over loopback gRPC as fast as the daemon accepts them, to the real `otel-evaluator serve` in its own process.

Prints accepted spans/s (durable: each request is answered after its group commit), server CPU-seconds per
million spans, and the server's peak RSS; then checks every span is in the file.

    .venv/bin/python bench/ingest.py                 # 1.5M spans, 4 client threads
    .venv/bin/python bench/ingest.py --spans 300000  # quicker

Every request has distinct span ids and trace ids and advancing timestamps (resending one payload would
measure the dedupe, not the ingest). Requests are derived from one serialized template by patching those bytes,
so the client spends its CPU on sending, not on building protobufs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.payload import make_request

SPANS_PER_REQUEST = 1000


class Template:
    """A serialized request plus the byte offsets of every span id, trace id and timestamp in it."""

    def __init__(self) -> None:
        base_ns = time.time_ns()
        req = make_request(SPANS_PER_REQUEST, seed=7, now_ns=base_ns)
        for sp in req.resource_spans[0].scope_spans[0].spans:
            sp.span_id = os.urandom(8)  # random bytes: each id's offset can be found unambiguously
        self.data = req.SerializeToString()
        self.trace_id = req.resource_spans[0].scope_spans[0].spans[0].trace_id
        self.span_ids = [s.span_id for s in req.resource_spans[0].scope_spans[0].spans]
        self.id_offsets = [self._find_one(sid) for sid in self.span_ids]
        times = [(s.start_time_unix_nano, s.end_time_unix_nano) for s in req.resource_spans[0].scope_spans[0].spans]
        self.time_offsets = [(self._find_one(struct.pack("<Q", a)), a) for a, _ in times]
        self.time_offsets += [(self._find_one(struct.pack("<Q", b)), b) for _, b in times]

    def _find_one(self, needle: bytes) -> int:
        first = self.data.find(needle)
        if first < 0 or self.data.find(needle, first + 1) >= 0:
            raise RuntimeError("template value is not unique in the payload")
        return first

    def derive(self, n: int, shift_ns: int) -> bytes:
        out = bytearray(self.data.replace(self.trace_id, os.urandom(16)))
        for i, off in enumerate(self.id_offsets):
            struct.pack_into(">Q", out, off, (n + 1) * 10_000 + i + 1)
        for off, value in self.time_offsets:
            struct.pack_into("<Q", out, off, value + shift_ns)
        return bytes(out)


def client_main(endpoint: str, requests: int, threads: int, compression: bool, conn: object) -> None:
    import grpc

    template = Template()
    # Time advances 1 ms of span time per request, like a steady stream of traffic.
    payloads = [template.derive(n, n * 1_000_000) for n in range(requests)]
    lock = threading.Lock()
    next_index = [0]
    retries = [0]
    errors: list[str] = []
    latencies: list[float] = []  # seconds from the first send of a request to its acknowledgement

    def worker() -> None:
        options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
        with grpc.insecure_channel(endpoint, options=options,
                                   compression=grpc.Compression.Gzip if compression else None) as channel:
            call = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                       request_serializer=None, response_deserializer=None)
            while True:
                with lock:
                    i = next_index[0]
                    next_index[0] += 1
                if i >= len(payloads):
                    return
                sent = time.perf_counter()
                while True:
                    try:
                        call(payloads[i], timeout=60)
                        with lock:
                            latencies.append(time.perf_counter() - sent)
                        break
                    except grpc.RpcError as err:
                        if err.code() == grpc.StatusCode.UNAVAILABLE:
                            with lock:
                                retries[0] += 1
                            time.sleep(0.05)
                            continue
                        errors.append(f"{err.code()}: {err.details()}")
                        return

    conn.send("ready")  # type: ignore[attr-defined]
    conn.recv()  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    ordered = sorted(latencies) or [float("nan")]
    conn.send({"elapsed": elapsed, "retries": retries[0], "errors": errors[:5],  # type: ignore[attr-defined]
               "bytes_per_request": len(payloads[0]),
               "ack_p50": ordered[len(ordered) // 2],
               "ack_p99": ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)]})


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spans", type=int, default=1_500_000, help="total spans to send (default 1.5M)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client connections (default 4)")
    parser.add_argument("--gzip", action="store_true", help="gzip-compress requests, as Collectors do")
    parser.add_argument("--db", help="DuckDB file (default: a temp dir)")
    parser.add_argument("--config", help="a config file for the daemon (e.g. to compare receivers.limits off)")
    parser.add_argument("--rules", help="rule files for the daemon (e.g. bench/heavy.rules.yaml: ingest while a rule "
                                        "runs over its time budget)")
    args = parser.parse_args()

    from evaluator.testing import DaemonProcess

    requests = max(1, args.spans // SPANS_PER_REQUEST)
    workdir = tempfile.mkdtemp(prefix="bench-ingest-")
    db = args.db or os.path.join(workdir, "bench.duckdb")
    daemon = DaemonProcess(["--db", db, "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                            "--admin-listen", "127.0.0.1:0", *(["--config", args.config] if args.config else []),
                            *(["--rules", args.rules] if args.rules else [])]).start()
    assert daemon.proc is not None
    pid = daemon.proc.pid
    parent, child = mp.Pipe()
    client = mp.get_context("spawn").Process(
        target=client_main, args=(daemon.grpc_endpoint, requests, args.clients, args.gzip, child))
    client.start()
    def receive() -> object:
        while not parent.poll(1.0):
            if not client.is_alive():
                daemon.kill()
                raise SystemExit("the client process died; see its traceback above")
        return parent.recv()

    assert receive() == "ready"  # payloads built; the timed phase starts now
    cpu0 = _cpu_seconds(pid)
    parent.send("go")
    result = receive()
    assert isinstance(result, dict)
    cpu1 = _cpu_seconds(pid)
    client.join()
    peak = _peak_rss_mib(pid)
    metrics = daemon.metrics()
    daemon.stop()
    import duckdb

    con = duckdb.connect(db, read_only=True)
    stored = con.execute("SELECT count(*) FROM spans").fetchone()[0]  # type: ignore[index]
    numbers = con.execute("SELECT count(*) FROM span_numbers").fetchone()[0]  # type: ignore[index]
    con.close()
    spans = requests * SPANS_PER_REQUEST
    commits = next((float(ln.split()[1]) for ln in metrics.splitlines()
                    if ln.startswith("otel_evaluator_store_commits_total ")), float("nan"))
    from evaluator.receiver.fastdecode import ACCELERATED

    report = {
        "spans": spans,
        "stored": stored,
        "numeric_rows": numbers,
        "clients": args.clients,
        "gzip": args.gzip,
        "c_decoder": ACCELERATED,
        "seconds": round(result["elapsed"], 2),
        "spans_per_second": round(spans / result["elapsed"]),
        "server_cpu_seconds_per_million_spans": round((cpu1 - cpu0) / spans * 1e6, 2),
        "server_peak_rss_mib": round(peak),
        "group_commits": int(commits),
        "mean_spans_per_commit": round(spans / commits) if commits == commits and commits else None,
        "ack_p50_ms": round(result["ack_p50"] * 1000, 1),
        "ack_p99_ms": round(result["ack_p99"] * 1000, 1),
        "rules": args.rules,
        "overload_retries": result["retries"],
        "errors": result["errors"],
        "request_bytes": result["bytes_per_request"],
        "cores": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))
    ok = stored == spans and not result["errors"]
    if not ok:
        print("FAILED: not every span was stored", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
