"""The client side of the admin endpoint, for the commands that ask a running daemon (ladder, sql, demo, export).

A bearer token comes from --token-file or the OTEL_EVALUATOR_TOKEN variable; an https:// admin URL is verified
against --cacert (or the system store), with --cert/--key for mTLS. AdminUnavailable means nothing answered;
AdminError means the daemon answered and refused.

Where ladder, sql and export read from (ask_daemon, open_file_store), so an answer never silently comes from
somewhere the user did not mean:
- neither --admin nor --db: the daemon at the default admin address; when nothing answers there, the file
  ./evaluator.duckdb, read-only, and stderr says so;
- --db alone: that file, no daemon asked (a kept copy is never mixed up with a live store);
- --admin alone: that daemon, never a file: when nothing answers, NothingAnswers (exit 2);
- both: that daemon, else that file (the user named both), and stderr says when the file answered.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

if TYPE_CHECKING:
    from evaluator.store.store import Store

T = TypeVar("T")

TOKEN_ENV = "OTEL_EVALUATOR_TOKEN"
DEFAULT_ADMIN = "http://127.0.0.1:13133"
DEFAULT_DB = "./evaluator.duckdb"


class AdminUnavailable(Exception):
    """No daemon answered at the admin address (connection refused, unresolvable, timed out)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"no daemon answering at {url}: {reason}")
        self.url = url
        self.reason = reason


class AdminError(Exception):
    """The daemon answered with an error status (status 0: the connection failed in a way that is not "nothing
    there", e.g. TLS)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message


class NothingAnswers(AdminError):
    """An explicit --admin (without --db) and nothing answers there: the command stops rather than read a file
    the user did not name."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(0, f"nothing answers at {url} ({reason}); --admin names the daemon to ask and is never "
                            "replaced by a file: start the daemon or fix the address, or read a stopped daemon's "
                            "file with --db PATH")
        self.url = url


@dataclass(frozen=True)
class AdminClient:
    url: str = DEFAULT_ADMIN
    token: str | None = None
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    timeout: float = 10.0

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float | None = None) -> tuple[bytes, str]:
        """(body, content type) of a 2xx answer. Raises AdminUnavailable or AdminError."""
        all_headers = dict(headers or {})
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url.rstrip("/") + path, data=body, method=method, headers=all_headers)
        context = None
        if self.url.startswith("https://"):
            context = ssl.create_default_context(cafile=self.cacert)
            if self.cert:
                context.load_cert_chain(self.cert, self.key)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout, context=context) as resp:
                return resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            message = exc.read().decode(errors="replace").strip()
            if exc.code == 401:
                message += (f" (this daemon wants a token: --token-file FILE or the {TOKEN_ENV} variable)"
                            if not self.token else " (the token was refused)")
            raise AdminError(exc.code, message) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLError):
                raise AdminError(0, f"TLS failed: {reason}") from None
            raise AdminUnavailable(self.url, str(reason)) from None

    def get_json(self, path: str) -> Any:
        body, _ = self.request("GET", path)
        return json.loads(body)

    def post_json(self, path: str, payload: Any, timeout: float | None = None) -> Any:
        body, _ = self.request("POST", path, json.dumps(payload).encode(),
                               {"Content-Type": "application/json"}, timeout=timeout)
        return json.loads(body)


def add_admin_arguments(parser: argparse.ArgumentParser) -> None:
    """--admin, --token-file, --cacert, --cert, --key: how a command reaches the running daemon."""
    parser.add_argument("--admin", metavar="URL",
                        help=f"the daemon's admin address (default {DEFAULT_ADMIN}); given, it is the only source "
                             "asked")
    parser.add_argument("--token-file", metavar="FILE",
                        help=f"file holding the bearer token (default: the {TOKEN_ENV} variable, if set)")
    parser.add_argument("--cacert", metavar="FILE", help="CA certificate to verify an https:// admin address")
    parser.add_argument("--cert", metavar="FILE", help="client certificate, when the admin server requires mTLS")
    parser.add_argument("--key", metavar="FILE", help="the client certificate's private key")


def client_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> AdminClient:
    """Raises ValueError when the token file cannot be read or is empty."""
    environ = os.environ if env is None else env
    token = environ.get(TOKEN_ENV) or None
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                lines = [ln.strip() for ln in f if ln.strip()]
        except OSError as exc:
            raise ValueError(f"--token-file: cannot read {args.token_file}: {exc.strerror}") from None
        if not lines:
            raise ValueError(f"--token-file: {args.token_file} holds no token")
        token = lines[0]
    return AdminClient(admin_url(args), token=token, cacert=args.cacert, cert=args.cert, key=args.key)


def admin_url(args: argparse.Namespace) -> str:
    """--admin, or the default address when it was not given (args.admin is None then)."""
    return str(args.admin or DEFAULT_ADMIN)


def source_choice(args: argparse.Namespace) -> tuple[bool, str]:
    """(read the file without asking a daemon, which file), for commands with a --db fallback: `--db` given
    without `--admin` means that file, so a kept copy is never mixed up with a live daemon's store."""
    return args.db is not None and args.admin is None, args.db or DEFAULT_DB


def ask_daemon(args: argparse.Namespace, call: Callable[[AdminClient], T]) -> T | None:
    """call(client) against the daemon, or None when the command should read the file instead: `--db` without
    `--admin`, or nothing answers and a file may answer instead (no --admin, or --db given too). Raises
    NothingAnswers when nothing answers at an --admin given without --db. AdminError (it answered: no) and
    ValueError (a bad token file) propagate."""
    file_only, _ = source_choice(args)
    if file_only:
        return None
    client = client_from_args(args)
    try:
        return call(client)
    except AdminUnavailable as exc:
        if args.admin is not None and args.db is None:
            raise NothingAnswers(exc.url, exc.reason) from None
        return None


def open_file_store(args: argparse.Namespace, err: TextIO | None = None) -> Store:
    """The file opened read-only, started. When it answers in place of a daemon, err (default stderr) says so:
    the answer is from the file, which may be older than a daemon's store. Raises StoreError saying why there is
    neither a daemon nor a readable file."""
    from evaluator.store.store import Store, StoreError, StoreSettings

    file_only, db = source_choice(args)
    store = Store(StoreSettings(path=db, read_only=True))
    try:
        store.start()
    except StoreError as exc:
        raise StoreError(str(exc) if file_only else f"no daemon at {admin_url(args)} and {exc}") from None
    if not file_only:
        (err or sys.stderr).write(f"otel-evaluator: no daemon answers at {admin_url(args)}; reading {db} "
                                  "(read-only)\n")
    return store
