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
from evaluator.admin.client import add_admin_arguments
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

    p = sub.add_parser("ladder", help="every rule on its rung, per dataset, model or series, and where to start",
                       description="Per subject (a dataset, a model, a series; docs/postmortem.md), the four rungs "
                                   "(freshness, completeness, distribution, prediction quality) top-down, each with "
                                   "every rule that judges it: status, value, since when and owner; the first rung "
                                   "that is not ok is marked as where to start. Asks the daemon's admin endpoint; "
                                   "with neither --admin nor --db and no daemon answering, reads ./evaluator.duckdb "
                                   "(read-only) and says so. Exit 0 ok, 1 --dataset/--model/--subject names nothing "
                                   "on the ladder (the known names are listed), 2 no daemon and no readable file, or "
                                   "bad usage.")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--dataset", metavar="NAME", help="one dataset (the series label data.dataset)")
    pick.add_argument("--model", metavar="NAME",
                      help="one model: name@version, or every version of a name, or a version (ml.model.*)")
    pick.add_argument("--subject", metavar="NAME", help="any subject by the name the ladder shows")
    p.add_argument("--service", metavar="NAME",
                   help="the subjects that spans with this service.name name (their data.dataset, model, labels)")
    add_admin_arguments(p)
    _add_db_fallback(p)
    p.add_argument("--rules", action="append", metavar="PATH",
                   help="with --db: the rule files the daemon ran, to place every rule on its rung (without them, "
                        "a rule's rung is the one its last transition recorded)")
    p.add_argument("--format", choices=("table", "json"), default="table")

    p = sub.add_parser("eval", help="evaluate rules at given times over a stopped daemon's file",
                       description="Evaluate every rule at --at over a DuckDB file (opened read-only; stop the "
                                   "daemon first, or copy its file) and print each rule, series, value, threshold "
                                   "and state: what a daemon started at that time says then, with the daemon's own "
                                   "evaluation code (docs/rules.md, \"One evaluation semantics\"). Several times "
                                   "print every rule's value per time. Exit 1 if a rule failed.")
    p.add_argument("--db", required=True, metavar="PATH", help="the DuckDB file")
    p.add_argument("--rules", required=True, action="append", metavar="PATH",
                   help="rule file or folder (repeatable)")
    p.add_argument("--at", required=True, nargs="+", action="extend", metavar="TIME",
                   help="one or more times: ISO-8601 (UTC unless a zone is given), unix seconds, or now")
    p.add_argument("--format", choices=("table", "json"), default="table")

    p = sub.add_parser("replay", help="re-evaluate history and print the transitions that would have happened",
                       description="Evaluate every rule group from --from to --to over a DuckDB file (read-only, "
                                   "state in memory) as a daemon started at --from would have, and print the alert "
                                   "transitions: for postmortems and for tuning thresholds. Each group is evaluated "
                                   "at its own slots (multiples of its interval), or every --step when given.")
    p.add_argument("--db", required=True, metavar="PATH", help="the DuckDB file")
    p.add_argument("--rules", required=True, action="append", metavar="PATH",
                   help="rule file or folder (repeatable)")
    p.add_argument("--from", dest="start", required=True, metavar="TIME", help="first evaluation time")
    p.add_argument("--to", dest="end", required=True, metavar="TIME", help="last evaluation time (inclusive)")
    p.add_argument("--step", metavar="DURATION",
                   help="evaluate every DURATION from --from (e.g. 1h, 1d) instead of at each group's slots")
    p.add_argument("--format", choices=("table", "json"), default="table")


def cmd_ladder(args: argparse.Namespace) -> int:
    from evaluator.postmortem.ladder import ladder_command

    configure_logging("warning")
    return ladder_command(args, sys.stdout, sys.stderr)


def cmd_test(args: argparse.Namespace) -> int:
    from evaluator.commands.rules import run_tests

    configure_logging("warning")
    return run_tests(args.paths, sys.stdout, sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    from evaluator.commands.rules import check

    return check(args.paths, sys.stdout, sys.stderr)


def cmd_eval(args: argparse.Namespace) -> int:
    from evaluator.clock import SystemClock
    from evaluator.commands.common import parse_time
    from evaluator.commands.rules import evaluate_at

    configure_logging("warning")
    now = SystemClock().now()
    try:
        times = [parse_time(t, now=now) for t in args.at]
    except ValueError as exc:
        print(f"otel-evaluator: --at: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return evaluate_at(args.db, args.rules, times, args.format, sys.stdout, sys.stderr)


def cmd_replay(args: argparse.Namespace) -> int:
    from evaluator.commands.common import parse_time, progress_stream
    from evaluator.commands.rules import replay

    configure_logging("warning")
    try:
        start, end = parse_time(args.start), parse_time(args.end)
    except ValueError as exc:
        print(f"otel-evaluator: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return replay(args.db, args.rules, start, end, args.step, args.format, sys.stdout, sys.stderr,
                  progress=progress_stream(sys.stderr))


def _add_db_fallback(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", metavar="PATH", help="the file, when no daemon answers (default ./evaluator.duckdb); "
                                                "given without --admin, the file is read and no daemon is asked")


def _postmortem_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sql", help="run one read-only SQL statement over the store (the daemon's, else the file)",
                       description="Run one read-only statement (SELECT, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN) over the "
                                   "store and print the result. Asks the running daemon (admin POST /query); when "
                                   "none answers, opens the DuckDB file read-only and runs the same checks and "
                                   "limits. Anything that would write, and file access, is refused. Exit 0 ok, 1 the "
                                   "query failed or was refused, 2 no daemon and no readable file, or bad usage.")
    p.add_argument("statement", metavar="SQL", help="the statement, or - to read it from stdin")
    add_admin_arguments(p)
    _add_db_fallback(p)
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--max-rows", type=int, metavar="N",
                   help="row limit (default 10000; the daemon allows up to its admin.query.max_rows)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="time limit (default and maximum 30)")

    p = sub.add_parser("export", help="write every public table to Parquet files (zstd) and a manifest.json",
                       description="Export the store's public tables (docs/schema.md) to DIR: one zstd-compressed "
                                   "Parquet file per table and manifest.json. Reads from the running daemon (admin "
                                   "POST /query, in bounded chunks); when none answers, from the DuckDB file "
                                   "(read-only). A progress line goes to stderr when it is a terminal "
                                   "(OTEL_EVALUATOR_PROGRESS=1 forces it, =0 silences it). Exit 0 ok, 1 the export "
                                   "failed, 2 no daemon and no readable file, or bad usage.")
    p.add_argument("--to", required=True, metavar="DIR", help="the folder to write (created if needed)")
    p.add_argument("--tables", metavar="A,B", help="only these tables (comma-separated; default all public ones)")
    p.add_argument("--since", metavar="TIME",
                   help="only spans (and their attributes) that ended at or after TIME (ISO-8601 or unix seconds)")
    add_admin_arguments(p)
    _add_db_fallback(p)
    p.add_argument("--chunk-rows", type=int, default=100_000, metavar="N",
                   help="rows per request to the daemon, and per Parquet row group (default 100000)")


def cmd_sql(args: argparse.Namespace) -> int:
    from evaluator.commands.sql import sql_command

    configure_logging("warning")
    return sql_command(args, sys.stdin, sys.stdout, sys.stderr)


def cmd_export(args: argparse.Namespace) -> int:
    from evaluator.commands.export import export_command

    configure_logging("warning")
    return export_command(args, sys.stdout, sys.stderr)


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the payments story end to end in under a minute: send, evaluate, the ladder",
                       description="Send 14 healthy days and then the broken day of the payments feature pipeline "
                                   "with the OpenTelemetry SDK, evaluate the rules now and print the ladder, with "
                                   "freshness as where to start. With --local, --keep or --rules, or when no daemon "
                                   "answers at the default admin address, it starts one with the repository's "
                                   "payments rules (its store in a temporary directory, or in --keep DIR); otherwise "
                                   "it uses the "
                                   "daemon at --admin (send to --endpoint, POST /evaluate), says so first, and the "
                                   "demo's spans stay in that daemon's store. Exit 0 when freshness was shown as the "
                                   "first failing rung, 1 otherwise, 2 bad usage (also: nothing answers at an --admin "
                                   "given), 3 the demo daemon did not start.")
    add_admin_arguments(p)
    p.add_argument("--endpoint", metavar="HOST:PORT",
                   help="with a running daemon: its OTLP/gRPC address (default 127.0.0.1:4317)")
    p.add_argument("--local", action="store_true",
                   help="start a daemon of the demo's own even if one answers at the default admin address")
    p.add_argument("--keep", metavar="DIR",
                   help="start a daemon of the demo's own (as --local) whose DuckDB file goes to "
                        "DIR/evaluator.duckdb and stays (default: a temporary directory, removed at the end)")
    p.add_argument("--rules", action="append", metavar="PATH",
                   help="start a daemon of the demo's own (as --local) with this rule file or folder "
                        "(repeatable; default: the repository's rules/)")


def cmd_demo(args: argparse.Namespace) -> int:
    from evaluator.commands.demo import run

    configure_logging("warning")
    return run(args, sys.stdout, sys.stderr)


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
    _postmortem_parsers(sub)
    _demo_parser(sub)
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
    try:
        daemon = Daemon(cfg, log=log)
    except InvalidConfig as exc:  # the exporter settings or the token source, checked against the environment
        print("otel-evaluator: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
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
                "ladder": cmd_ladder, "sql": cmd_sql, "export": cmd_export, "demo": cmd_demo}
    return handlers[args.command](args)
