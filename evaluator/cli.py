"""Command line: `otel-evaluator <command>`. Only this module exits the process.

Exit codes: 0 success, 1 a check or test found problems, 2 bad usage or invalid configuration, 3 start-up failed
(a port in use, the DuckDB file locked by another process).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

import structlog

from evaluator import __version__
from evaluator.admin.client import add_admin_arguments, client_from_args
from evaluator.log import LEVELS, configure_logging

# Keep the imports above light: importing numpy, grpc or pyarrow starts threads, and `serve` must block its
# stop signals before any thread exists. Heavy modules are imported inside the commands.

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_STARTUP = 0, 1, 2, 3
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the daemon: receive OTLP spans, store them, evaluate rules",
        description=(
            "Run the evaluator daemon. With no options it listens for OTLP/gRPC on 127.0.0.1:4317, OTLP/HTTP on "
            "127.0.0.1:4318 and serves /healthz, /readyz and /metrics on 127.0.0.1:13133, storing spans in "
            "./evaluator.duckdb. Flags override the config file; a port of 0 picks a free port (the chosen "
            "ports are logged). SIGTERM or SIGINT stops it gracefully: in-flight exports finish, everything "
            "is committed and checkpointed, exit code 0."
        ),
    )
    p.add_argument("--config", metavar="FILE", help="YAML config file (see docs/configuration.md)")
    p.add_argument("--db", metavar="PATH", help="DuckDB file (default ./evaluator.duckdb)")
    p.add_argument("--grpc-listen", metavar="HOST:PORT", help="OTLP/gRPC address (default 127.0.0.1:4317)")
    p.add_argument("--http-listen", metavar="HOST:PORT", help="OTLP/HTTP address (default 127.0.0.1:4318)")
    p.add_argument("--admin-listen", metavar="HOST:PORT", help="admin HTTP address (default 127.0.0.1:13133)")
    p.add_argument("--rules", metavar="PATH", action="append",
                   help="a rule file or a folder of them (repeatable; see docs/rules.md). SIGHUP reloads them")
    p.add_argument("--log-level", choices=LEVELS, help="default info")
    p.add_argument("--log-format", choices=("auto", "json", "console"),
                   help="auto (default): console on a terminal, JSON lines otherwise")


def _rule_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="validate rule files without starting anything (exit 0 ok, 1 problems)",
                       description="Validate rule files and folders; every problem is listed with file, line and "
                                   "key. Exit code 0 when they are valid, 1 when not.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="rule files or folders of them")

    p = sub.add_parser("test", help="run rule unit tests (promtool-style test files; exit 0 all pass, 1 not)",
                       description="Run rule unit tests: each test file names rule files, gives input runs in a "
                                   "series notation and the alerts expected at evaluation times (docs/rules.md). "
                                   "Each test runs on a fresh DuckDB file through the real ingest path and engine.")
    p.add_argument("paths", nargs="+", metavar="FILE", help="test files (*.test.yaml)")

    p = sub.add_parser("ladder", help="the four rungs per dataset, top-down, and where to start",
                       description="Per dataset, the four rungs (freshness, completeness, distribution, prediction "
                                   "quality) with each rung's status, value, since when and owner; the first firing "
                                   "rung is marked as where to start. Asks the running daemon's admin endpoint; when "
                                   "none answers, reads the DuckDB file (read-only).")
    p.add_argument("--dataset", metavar="NAME", help="one dataset (the series label data.dataset)")
    add_admin_arguments(p)
    p.add_argument("--db", default="./evaluator.duckdb", metavar="PATH", help="the file, when no daemon answers")
    p.add_argument("--format", choices=("table", "json"), default="table")

    p = sub.add_parser("eval", help="evaluate rules once, at a given time, over a stopped daemon's file",
                       description="Evaluate every rule once at --at over a DuckDB file (opened read-only; stop "
                                   "the daemon first, or copy its file) and print each rule, series, value, "
                                   "threshold and state. Alert state starts empty: per-run rules judge the runs "
                                   "within their lookback. Exit 1 if a rule failed.")
    p.add_argument("--db", required=True, metavar="PATH", help="the DuckDB file")
    p.add_argument("--rules", required=True, action="append", metavar="PATH", help="rule file or folder")
    p.add_argument("--at", required=True, metavar="TIME",
                   help="ISO-8601 (UTC unless a zone is given), unix seconds, or now")
    p.add_argument("--format", choices=("table", "json"), default="table")

    p = sub.add_parser("replay", help="re-evaluate history and print the transitions that would have happened",
                       description="Evaluate every rule at --from, --from + --step, ... up to --to over a DuckDB "
                                   "file (read-only, state in memory) and print the alert transitions: for "
                                   "postmortems and for tuning thresholds.")
    p.add_argument("--db", required=True, metavar="PATH", help="the DuckDB file")
    p.add_argument("--rules", required=True, action="append", metavar="PATH", help="rule file or folder")
    p.add_argument("--from", dest="start", required=True, metavar="TIME", help="first evaluation time")
    p.add_argument("--to", dest="end", required=True, metavar="TIME", help="last evaluation time (inclusive)")
    p.add_argument("--step", required=True, metavar="DURATION", help="e.g. 1h, 1d")
    p.add_argument("--format", choices=("table", "json"), default="table")


def cmd_ladder(args: argparse.Namespace) -> int:
    import json
    import urllib.parse

    from evaluator.admin.client import AdminError, AdminUnavailable
    from evaluator.postmortem.ladder import DatasetLadder, Rung, build_ladder, render_table
    from evaluator.store.store import Store, StoreError, StoreSettings

    configure_logging("warning")

    query = "?" + urllib.parse.urlencode({"dataset": args.dataset}) if args.dataset else ""
    ladders: list[DatasetLadder] | None = None
    try:
        data = client_from_args(args).get_json("/ladder" + query)
        ladders = [DatasetLadder(d["dataset"], [Rung(**r) for r in d["rungs"]], d["start_here"]) for d in data]
    except AdminUnavailable:
        pass  # no daemon answering: read the file
    except (AdminError, ValueError) as exc:
        print(f"otel-evaluator: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if ladders is None:
        store = Store(StoreSettings(path=args.db, read_only=True))
        try:
            store.start()
        except StoreError as exc:
            print(f"otel-evaluator: no daemon at {args.admin} and {exc}", file=sys.stderr)
            return EXIT_USAGE
        cur = store.cursor()
        try:
            ladders = build_ladder(cur, args.dataset)
        finally:
            cur.close()
            store.shutdown()
    if args.format == "json":
        print(json.dumps([lad.as_dict() for lad in ladders], indent=2))
    else:
        sys.stdout.write(render_table(ladders))
    return EXIT_OK


def cmd_test(args: argparse.Namespace) -> int:
    from evaluator.rules.ruletest import run_test_files

    configure_logging("warning")
    return run_test_files(args.paths, sys.stdout, sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    from evaluator.rules.commands import check

    return check(args.paths, sys.stdout, sys.stderr)


def cmd_eval(args: argparse.Namespace) -> int:
    from evaluator.clock import SystemClock
    from evaluator.rules.commands import evaluate_at, parse_time

    configure_logging("warning")
    try:
        at = parse_time(args.at, now=SystemClock().now())
    except ValueError as exc:
        print(f"otel-evaluator: --at: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return evaluate_at(args.db, args.rules, at, args.format, sys.stdout, sys.stderr)


def cmd_replay(args: argparse.Namespace) -> int:
    from evaluator.rules.commands import parse_time, replay

    configure_logging("warning")
    try:
        start, end = parse_time(args.start), parse_time(args.end)
    except ValueError as exc:
        print(f"otel-evaluator: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return replay(args.db, args.rules, start, end, args.step, args.format, sys.stdout, sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otel-evaluator",
        description=(
            "An OTLP evaluator daemon: stores the payload signals on your spans (data.*, ml.*) in DuckDB and "
            "judges them with population-level rules across four rungs: freshness, completeness, distribution "
            "and prediction quality."
        ),
    )
    parser.add_argument("--version", action="version", version=f"otel-evaluator {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _serve_parser(sub)
    _rule_parsers(sub)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    # Signals are taken synchronously with sigwait on this thread, never by an asynchronous handler: a handler
    # runs between two bytecodes of whatever the main thread is doing, and one that logs or sets an Event can
    # deadlock on a lock the interrupted code holds (seen: SIGTERM during the "started" log line hung the
    # daemon). They are blocked before anything starts a thread (importing grpc does), so every thread
    # inherits the mask and none takes the default action.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS | {signal.SIGHUP})
    from evaluator.config import apply_overrides, load_config
    from evaluator.daemon import Daemon
    from evaluator.store.store import StoreError
    from evaluator.yamlsrc import InvalidConfig

    try:
        cfg = apply_overrides(
            load_config(args.config), db=args.db, grpc_listen=args.grpc_listen, http_listen=args.http_listen,
            admin_listen=args.admin_listen, log_level=args.log_level, log_format=args.log_format,
            rules=args.rules,
        )
    except InvalidConfig as exc:
        configure_logging()
        print("otel-evaluator: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(cfg.log_level, cfg.log_format)
    log = structlog.get_logger("otel-evaluator")
    daemon = Daemon(cfg, log=log)
    try:
        daemon.start()
    except InvalidConfig as exc:
        print("otel-evaluator: invalid rules:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, StoreError) as exc:
        log.error("start-up failed", error=str(exc))
        return EXIT_STARTUP
    try:
        while True:
            received = signal.sigwait(_STOP_SIGNALS | {signal.SIGHUP})
            log.info("signal received", signal=signal.Signals(received).name)
            if received != signal.SIGHUP:
                break
            daemon.reload_rules()
    finally:
        daemon.shutdown()
        log.info("otel-evaluator stopped")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    handlers = {"serve": cmd_serve, "check": cmd_check, "test": cmd_test, "eval": cmd_eval, "replay": cmd_replay,
                "ladder": cmd_ladder}
    return handlers[args.command](args)
