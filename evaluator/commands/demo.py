"""`otel-evaluator demo`: the whole product on the payments story in well under a minute.

Mode A (no daemon answers at the default admin address, or --local, or --keep DIR): start a real daemon
(`python -m evaluator serve`, free loopback ports, the payments rules) in a temporary directory, or in --keep DIR;
send 14 healthy days and the broken day with the OpenTelemetry SDK over OTLP/gRPC; evaluate every rule group now
(admin POST /evaluate); print the ladder; stop the daemon. Mode B (a daemon answers at --admin): the same data goes
to that daemon (--endpoint), which evaluates it and whose ladder is printed. Before sending, mode B says whose store
the spans go into (the daemon's address and, when it tells, its file) and that they stay there: the demo cannot
take them out again. --keep DIR and --rules configure a daemon the demo starts, so they mean mode A, as --local
does; any of them together with --admin or --endpoint (which name a running daemon) is refused, as is an --admin
where nothing answers (the demo does not silently start a daemon of its own in place of the one named).

Exit 0 when the ladder named freshness as the first failing rung of the payments dataset, 1 otherwise, 2 bad usage
(rules not found, --keep DIR already holds a store, an unreadable token file, contradicting options, nothing
answering at --admin), 3 the demo daemon did not start.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import evaluator
from evaluator.admin.client import AdminClient, AdminError, AdminUnavailable, admin_url, client_from_args
from evaluator.demo import payments
from evaluator.postmortem.ladder import SubjectLadder, render_table

EXIT_OK, EXIT_NOT_SHOWN, EXIT_USAGE, EXIT_STARTUP = 0, 1, 2, 3
DEFAULT_ENDPOINT = "127.0.0.1:4317"
PAYMENTS_GROUP = "payments-contract"
PORTS = ["--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]


def default_rules() -> Path:
    """The repository's rules/ folder, next to the package in a checkout (an editable install)."""
    return Path(evaluator.__file__).resolve().parents[1] / "rules"


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    t0 = time.monotonic()
    try:
        client = client_from_args(args)
    except ValueError as exc:
        err.write(f"otel-evaluator: {exc}\n")
        return EXIT_USAGE
    # --keep and --rules configure a daemon the demo starts, so they mean one, as --local does
    own = next((opt for opt, given in (("--keep", args.keep), ("--rules", args.rules), ("--local", args.local))
                if given), None)
    if own is not None:
        named = [opt for opt, value in (("--admin", args.admin), ("--endpoint", args.endpoint)) if value]
        if named:
            verb = "names" if len(named) == 1 else "name"
            err.write(f"otel-evaluator: {own} runs the demo on a daemon of its own, and {' and '.join(named)} "
                      f"{verb} a running daemon to use instead: give one or the other\n")
            return EXIT_USAGE
        return _with_own_daemon(args, out, err, t0)
    try:
        client.request("GET", "/healthz", timeout=2.0)
    except AdminUnavailable as exc:
        if args.admin is not None:
            err.write(f"otel-evaluator: nothing answers at {client.url} ({exc.reason}); --admin names the daemon "
                      "the demo should use: start it or fix the address, or drop --admin to let the demo start "
                      "its own\n")
            return EXIT_USAGE
        out.write(f"otel-evaluator demo: no daemon answers at {client.url}, so the demo starts one of its own\n")
        return _with_own_daemon(args, out, err, t0)
    except AdminError as exc:
        err.write(f"otel-evaluator: the daemon at {admin_url(args)} answered /healthz with {exc}\n")
        return EXIT_NOT_SHOWN
    return _with_running_daemon(client, args.endpoint or DEFAULT_ENDPOINT, out, err, t0)


def _resolve_rules(given: list[str] | None, err: TextIO) -> list[str] | None:
    if given:
        missing = [p for p in given if not Path(p).exists()]
        if missing:
            err.write(f"otel-evaluator: --rules: no such file or folder: {', '.join(missing)}\n")
            return None
        return [str(Path(p).resolve()) for p in given]
    folder = default_rules()
    if not (folder / "payments.rules.yaml").is_file():
        err.write(f"otel-evaluator: the payments rules are not at {folder}. The demo reads the repository's rules/ "
                  "folder: run it from a checkout installed with `pip install -e .`, or pass --rules PATH "
                  "(a copy of rules/payments.rules.yaml and rules/payments-drift.rules.yaml).\n")
        return None
    return [str(folder)]


def _with_own_daemon(args: argparse.Namespace, out: TextIO, err: TextIO, t0: float) -> int:
    from evaluator.testing import DaemonProcess

    rules = _resolve_rules(args.rules, err)
    if rules is None:
        return EXIT_USAGE
    if args.keep:
        workdir = Path(args.keep).resolve()
        if (workdir / "evaluator.duckdb").exists():
            err.write(f"otel-evaluator: {workdir / 'evaluator.duckdb'} already exists; --keep needs a folder "
                      "without a store (the demo's data would mix with what is there)\n")
            return EXIT_USAGE
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="otel-evaluator-demo-"))
    db = workdir / "evaluator.duckdb"
    config = workdir / "demo.config.yaml"  # a throwaway daemon: its own Watchdog would only crowd the story
    config.write_text("self_monitoring:\n  enabled: false\n")
    daemon = DaemonProcess(["--config", str(config), "--db", str(db), *(a for r in rules for a in ("--rules", r)),
                            *PORTS], cwd=str(workdir))
    # The demo's alerts stay in the demo: no OTLP alert export to wherever this shell's variables point.
    daemon.env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out.write("otel-evaluator demo: the payments feature pipeline, 14 healthy days and then the broken day\n")
    try:
        try:
            daemon.start(timeout=60)
        except RuntimeError as exc:
            err.write(f"otel-evaluator: the demo daemon did not start: {exc}\n")
            return EXIT_STARTUP
        kept = "kept after the demo" if args.keep else "a temporary directory, removed at the end"
        out.write(f"  started a daemon of the demo's own: store {db} ({kept}), rules {', '.join(rules)}\n")
        try:
            code = _send_evaluate_show(AdminClient(daemon.admin_url, timeout=60), daemon.grpc_endpoint, None,
                                       out, err)
        finally:
            stopped = daemon.stop()
            if stopped != 0:
                err.write("otel-evaluator: the demo daemon exited with " + str(stopped) + "\n"
                          + "\n".join(daemon.lines[-20:]) + "\n")
        _what_next(out, str(db) if args.keep else None, rules)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    out.write(f"done in {time.monotonic() - t0:.1f} s"
              + ("" if args.keep else " (the temporary store is removed; --keep DIR keeps it)") + "\n")
    return code


def _with_running_daemon(client: AdminClient, endpoint: str, out: TextIO, err: TextIO, t0: float) -> int:
    out.write("otel-evaluator demo: the payments feature pipeline, 14 healthy days and then the broken day\n")
    store = _store_path(client)
    out.write(f"  using the daemon at {client.url}: the demo's spans go to its OTLP/gRPC endpoint {endpoint} and "
              f"into its store ({store or 'the daemon did not say which file'}), and stay there: the demo cannot "
              "take them out again, and the daemon's rules judge them like any other data.\n"
              "  For a store of the demo's own: otel-evaluator demo --local (or --keep DIR)\n")
    out.flush()
    headers = {"authorization": f"Bearer {client.token}"} if client.token else None
    code = _send_evaluate_show(client, endpoint, headers, out, err)
    _what_next(out, None, None, admin=client.url)
    out.write(f"done in {time.monotonic() - t0:.1f} s\n")
    return code


def _store_path(client: AdminClient) -> str | None:
    """The running daemon's DuckDB file, asked over its read-only SQL endpoint; None when it does not answer."""
    sql = "SELECT path FROM duckdb_databases() WHERE database_name = current_database()"
    try:
        answer = client.post_json("/query", {"sql": sql, "format": "json"}, timeout=10)
        rows = answer.get("rows") if isinstance(answer, dict) else None
        return str(rows[0][0]) if rows and rows[0] and rows[0][0] else None
    except (AdminUnavailable, AdminError, ValueError):
        return None


def _send_evaluate_show(client: AdminClient, endpoint: str, headers: dict[str, str] | None, out: TextIO,
                        err: TextIO) -> int:
    spans = payments.story(time.time())
    runs = sum(1 for s in spans if s.name == payments.RUN_SPAN)
    try:
        payments.send(endpoint, spans, headers)
    except payments.SendFailed as exc:
        err.write(f"otel-evaluator: {exc} (is {endpoint} the daemon's OTLP/gRPC address? see --endpoint)\n")
        return EXIT_NOT_SHOWN
    out.write(f"  sent {runs} daily runs of {payments.RUN_SPAN} ({payments.SERVICE}) and {len(spans) - runs} "
              f"{payments.TXN_SPAN} spans ({payments.TXN_SERVICE})\n"
              f"    with the OpenTelemetry SDK over OTLP/gRPC to {endpoint}. The last run, a minute ago, is broken:\n"
              f"    its newest event is six hours old, {payments.BROKEN_ROWS:,} rows instead of about 10 million, "
              "amounts 100x smaller\n")
    out.flush()
    try:
        result = client.post_json("/evaluate", {}, timeout=120)
        data = client.get_json("/ladder")
    except (AdminUnavailable, AdminError) as exc:
        err.write(f"otel-evaluator: {exc}\n")
        return EXIT_NOT_SHOWN
    groups = [g["name"] for g in result["groups"]]
    transitions: list[dict[str, Any]] = result["transitions"]
    out.write(f"  evaluated {len(groups)} rule group(s) now (POST /evaluate): {len(transitions)} transition(s)\n")
    for t in transitions:
        series = ", ".join(f"{k}={v}" for k, v in t["series"].items())
        value = "" if t.get("value") is None else f" value {_num(t['value'])}"
        # a transition in the alerts table's terms (state, rule_id), or in the older to/rule of POST /evaluate
        state, rule = t.get("state", t.get("to")), t.get("rule_id", t.get("rule"))
        out.write(f"    {state:<8} {rule} [{series}]{value}{' (inhibited)' if t.get('inhibited') else ''}\n")
    for rule_id, error in sorted(result.get("unhealthy", {}).items()):
        out.write(f"    unhealthy {rule_id}: {error}\n")
    if PAYMENTS_GROUP not in groups:
        out.write(f"\nThe daemon at {client.url} has no payments rules loaded (no rule group {PAYMENTS_GROUP}), so "
                  "nothing judged this data as the story does. Start it with them:\n"
                  "  otel-evaluator serve --rules rules/      (or: make serve ARGS=\"--rules rules/\")\n")
    ladders = [SubjectLadder.from_dict(d) for d in data]
    out.write("\nThe ladder (otel-evaluator ladder): every rule on its rung, per dataset, model or series, "
              "top-down\n")
    out.write(render_table(ladders, f"the ladder is empty: the daemon at {client.url} has no rules loaded"))
    mine = next((lad for lad in ladders if lad.dataset == payments.DATASET), None)
    if mine is None and PAYMENTS_GROUP in groups:
        err.write(f"otel-evaluator: {payments.DATASET} is not on the ladder of the daemon at {client.url}: did the "
                  f"spans go to another daemon? (they were sent to {endpoint}; see --endpoint)\n")
        return EXIT_NOT_SHOWN
    if mine is None or mine.start_here != "freshness":
        err.write("otel-evaluator: the ladder did not name freshness as the first failing rung of "
                  f"{payments.DATASET}\n")
        return EXIT_NOT_SHOWN
    rung = next(r for r in mine.rungs if r.rung == "freshness")
    below = [r.rung for r in mine.rungs if r.status == "firing" and r.rung != "freshness"]
    out.write(f"\nStart at rung 1: page {rung.owner} (freshness). "
              + (f"{' and '.join(below).capitalize()} fired too: downstream of stale data until freshness is "
                 "fixed (the amounts' unit change is partner-integration's).\n" if below else "\n"))
    return EXIT_OK


def _what_next(out: TextIO, db: str | None, rules: list[str] | None, admin: str | None = None) -> None:
    """The commands to go on with: over the kept file (mode A), or against the running daemon (mode B)."""
    now = datetime.now(UTC)
    frm = datetime.fromtimestamp(now.timestamp() - 15 * payments.DAY, tz=UTC).strftime("%Y-%m-%dT%H:00:00Z")
    to = now.strftime("%Y-%m-%dT%H:%M:00Z")
    query = "\"SELECT end_time, name FROM spans WHERE name = 'features.daily.run' ORDER BY end_time\""
    out.write("\nWhat next:\n")
    if admin is not None:
        out.write(f"  otel-evaluator ladder --admin {admin}\n"
                  f"  otel-evaluator sql --admin {admin} {query}\n"
                  "  otel-evaluator replay --db evaluator.duckdb --rules rules/ "
                  f"--from {frm} --to {to} --step 1h   # over a stopped daemon's file, or a copy\n")
    else:
        path = db or "demo/evaluator.duckdb"
        rules_arg = "rules/" if rules is None or rules == [str(default_rules())] else " --rules ".join(rules)
        if db is None:
            out.write("  otel-evaluator demo --keep demo     # keep the store this time, then:\n")
        out.write(f"  otel-evaluator ladder --db {path} --rules {rules_arg}\n"
                  f"  otel-evaluator sql --db {path} {query}\n"
                  f"  otel-evaluator replay --db {path} --rules {rules_arg} --from {frm} --to {to} --step 1h\n")
    out.write("  docs/postmortem.md: walking the ladder during an incident, with this data and the SQL to ask it\n")


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
