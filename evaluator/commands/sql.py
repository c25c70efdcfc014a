"""`otel-evaluator sql`: one read-only statement over the daemon's store (admin POST /query) or a file."""

from __future__ import annotations

import json
from typing import Any

from evaluator.postmortem.query import (
    CLIENT_WAIT_SECONDS,
    QueryProblem,
    QueryRunner,
    error_message,
    render_csv,
    text_value,
)

NUMERIC_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
                 "UBIGINT", "UHUGEINT", "FLOAT", "DOUBLE", "DECIMAL", "REAL")
MAX_CELL = 100


def render_table(doc: dict[str, Any]) -> str:
    """A result (as_dict form) as an aligned text table: columns padded, numbers right-aligned, then "N rows"."""
    names = [c["name"] for c in doc["columns"]]
    numeric = [str(c["type"]).split("(")[0] in NUMERIC_TYPES for c in doc["columns"]]
    cells = [[_cell(v) for v in row] for row in doc["rows"]]
    widths = [max([len(n)] + [len(r[i]) for r in cells]) for i, n in enumerate(names)]
    lines = [" | ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)).rstrip(),
             "-+-".join("-" * w for w in widths)]
    for row in cells:
        lines.append(" | ".join(v.rjust(w) if num else v.ljust(w)
                                for v, w, num in zip(row, widths, numeric, strict=True)).rstrip())
    n = doc["row_count"]
    lines.append(f"{n} row" + ("" if n == 1 else "s"))
    if doc.get("truncated"):
        lines.append(f"(truncated at {n} rows: raise --max-rows or narrow the query)")
    return "\n".join(lines) + "\n"


def _cell(v: Any) -> str:
    text = text_value(v).replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return text if len(text) <= MAX_CELL else text[:MAX_CELL - 1] + "…"


def sql_command(args: Any, stdin: Any, stdout: Any, stderr: Any) -> int:
    """`otel-evaluator sql`: ask the daemon's POST /query; when none answers, run it on the file, read-only.
    Exit 0 ok, 1 the query failed or was refused, 2 no daemon and no readable file, or bad usage."""
    from evaluator.admin.client import AdminClient, AdminError, ask_daemon, open_file_store
    from evaluator.store.store import StoreError

    sql = stdin.read() if args.statement == "-" else args.statement
    if not sql.strip():
        print("otel-evaluator: no SQL given (pass a statement, or - to read it from stdin)", file=stderr)
        return 2
    payload: dict[str, Any] = {"sql": sql, "format": "json"}
    if args.max_rows is not None:
        payload["max_rows"] = args.max_rows
    if args.timeout is not None:
        payload["timeout"] = args.timeout

    def ask(client: AdminClient) -> dict[str, Any]:
        body, _ = client.request("POST", "/query", json.dumps(payload).encode(),
                                 {"Content-Type": "application/json"},
                                 timeout=args.timeout + 30.0 if args.timeout else CLIENT_WAIT_SECONDS)
        answer: dict[str, Any] = json.loads(body)
        return answer

    try:
        doc = ask_daemon(args, ask)
    except AdminError as exc:
        print(f"otel-evaluator: {error_message(exc.message)}" if exc.status in (400, 413, 503)
              else f"otel-evaluator: {exc}", file=stderr)
        return 1 if exc.status in (400, 413, 503) else 2
    except ValueError as exc:
        print(f"otel-evaluator: {exc}", file=stderr)
        return 2
    if doc is None:
        try:
            store = open_file_store(args)
        except StoreError as exc:
            print(f"otel-evaluator: {exc}", file=stderr)
            return 2
        try:
            doc = QueryRunner(store.cursor).run(sql, args.max_rows, args.timeout).as_dict()
        except QueryProblem as exc:
            print(f"otel-evaluator: {exc}", file=stderr)
            return 1
        finally:
            store.shutdown()
    if args.format == "json":
        stdout.write(json.dumps(doc, indent=2) + "\n")
    elif args.format == "csv":
        stdout.write(render_csv([c["name"] for c in doc["columns"]], doc["rows"]))
        if doc.get("truncated"):
            print(f"otel-evaluator: truncated at {doc['row_count']} rows (raise --max-rows)", file=stderr)
    else:
        stdout.write(render_table(doc))
    return 0
