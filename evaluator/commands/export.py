"""`otel-evaluator export`: the public tables to zstd Parquet, from the daemon (in chunks) or a file."""

from __future__ import annotations

from typing import Any, TextIO

from evaluator.commands.common import parse_time, progress_stream
from evaluator.postmortem.export import (
    ONE_KEY_MAX_ROWS,
    DaemonSource,
    ExportError,
    FileSource,
    Progress,
    Source,
    export,
)
from evaluator.store.schema import PUBLIC_TABLES


def export_command(args: Any, stdout: TextIO, stderr: TextIO) -> int:
    """Exit 0 ok, 1 the export failed, 2 no daemon and no readable file, or bad usage."""
    from evaluator.admin.client import AdminClient, AdminError, AdminUnavailable, ask_daemon, open_file_store
    from evaluator.store.store import StoreError

    tables = [t.strip() for t in args.tables.split(",") if t.strip()] if args.tables else list(PUBLIC_TABLES)
    unknown = [t for t in tables if t not in PUBLIC_TABLES]
    if unknown or not tables:
        print(f"otel-evaluator: --tables: unknown table(s) {', '.join(unknown) or '(none given)'}; the public "
              f"tables are {', '.join(PUBLIC_TABLES)}", file=stderr)
        return 2
    if args.chunk_rows < 1 or args.chunk_rows > ONE_KEY_MAX_ROWS:
        print(f"otel-evaluator: --chunk-rows must be between 1 and {ONE_KEY_MAX_ROWS}", file=stderr)
        return 2
    since = None
    if args.since:
        try:
            since = parse_time(args.since)
        except ValueError as exc:
            print(f"otel-evaluator: --since: {exc}", file=stderr)
            return 2
    progress = Progress(progress_stream(stderr))
    source: Source
    file_source: FileSource | None = None
    def daemon_source(client: AdminClient) -> DaemonSource:
        client.request("GET", "/healthz")  # is a daemon there?
        return DaemonSource(client)

    try:
        daemon = ask_daemon(args, daemon_source)
    except (AdminError, ValueError) as exc:
        print(f"otel-evaluator: {exc}", file=stderr)
        return 2
    if daemon is not None:
        source = daemon
    else:
        try:
            file_source = FileSource(open_file_store(args))
        except StoreError as exc:
            print(f"otel-evaluator: {exc}", file=stderr)
            return 2
        source = file_source
    try:
        export(source, args.to, tables, since, args.chunk_rows, stdout, progress)
    except (ExportError, OSError) as exc:
        print(f"\notel-evaluator: export failed: {exc}", file=stderr)
        return 1
    except AdminUnavailable as exc:
        print(f"\notel-evaluator: export failed: the daemon went away: {exc}", file=stderr)
        return 1
    finally:
        if file_source is not None:
            file_source.close()
    return 0

