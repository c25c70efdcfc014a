"""The admin client the CLI commands use: token sources, telling "nothing answers" from "answered: no", and where
ladder, sql and export read from: an --admin given is the only source asked; the implicit fallback to
./evaluator.duckdb says so."""

from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from evaluator.admin.client import (
    TOKEN_ENV,
    AdminClient,
    AdminError,
    AdminUnavailable,
    NothingAnswers,
    add_admin_arguments,
    ask_daemon,
    client_from_args,
    open_file_store,
    source_choice,
)
from evaluator.httpbase import HttpServer, Request, Response, text
from evaluator.store.store import Store, StoreSettings


@pytest.fixture
def echo() -> Iterator[str]:
    """A real HTTP server answering with the Authorization header it got; /refuse answers 403."""

    def headers(request: Request) -> Response:
        body = request.read_body(1024)
        return Response(200, json.dumps({"authorization": request.headers.get("Authorization"),
                                         "method": request.method, "body": body.decode()}).encode(),
                        "application/json")

    server = HttpServer("echo", "127.0.0.1:0", {"/echo": headers, "/refuse": lambda r: text(403, "go away"),
                                                 "/locked": lambda r: text(401, "bearer token missing")})
    server.start()
    yield f"http://127.0.0.1:{server.port}"
    server.shutdown(1)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_admin_arguments(parser)
    return parser.parse_args(list(argv))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: nothing listens there


def test_token_from_env_and_file_file_wins(tmp_path: Path, echo: str) -> None:
    assert client_from_args(_args("--admin", echo), env={}).token is None
    assert client_from_args(_args("--admin", echo), env={TOKEN_ENV: "from-env"}).token == "from-env"
    token_file = tmp_path / "token"
    token_file.write_text("\n  from-file  \nsecond\n")
    client = client_from_args(_args("--admin", echo, "--token-file", str(token_file)), env={TOKEN_ENV: "from-env"})
    assert client.token == "from-file"
    assert client.get_json("/echo")["authorization"] == "Bearer from-file"
    assert client.post_json("/echo", {"a": 1}) == {"authorization": "Bearer from-file", "method": "POST",
                                                   "body": '{"a": 1}'}


def test_unreadable_or_empty_token_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        client_from_args(_args("--token-file", str(tmp_path / "missing")), env={})
    (tmp_path / "empty").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no token"):
        client_from_args(_args("--token-file", str(tmp_path / "empty")), env={})


def test_refusal_is_an_error_and_silence_is_unavailable(echo: str) -> None:
    with pytest.raises(AdminError) as info:
        AdminClient(echo).get_json("/refuse")
    assert info.value.status == 403 and info.value.message == "go away"
    with pytest.raises(AdminUnavailable, match="no daemon answering"):
        AdminClient(f"http://127.0.0.1:{_free_port()}", timeout=2).get_json("/ladder")


def test_a_401_says_how_to_pass_a_token(echo: str) -> None:
    with pytest.raises(AdminError, match=f"--token-file FILE or the {TOKEN_ENV} variable"):
        AdminClient(echo).get_json("/locked")
    with pytest.raises(AdminError, match="the token was refused"):
        AdminClient(echo, token="wrong").get_json("/locked")


def _db_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_admin_arguments(parser)
    parser.add_argument("--db")
    return parser.parse_args(list(argv))


def test_db_without_admin_means_that_file_only() -> None:
    """ladder, sql and export: a --db given alone is read as is, never mixed up with a live daemon's store."""
    assert source_choice(_db_args()) == (False, "./evaluator.duckdb")
    assert source_choice(_db_args("--db", "kept.duckdb")) == (True, "kept.duckdb")
    assert source_choice(_db_args("--db", "kept.duckdb", "--admin", "http://h:1")) == (False, "kept.duckdb")
    # --admin given as the default address is still given: it is the only source then
    assert source_choice(_db_args("--admin", "http://127.0.0.1:13133")) == (False, "./evaluator.duckdb")
    assert _db_args().admin is None and client_from_args(_db_args(), env={}).url == "http://127.0.0.1:13133"


def test_ask_daemon_asks_only_the_admin_given_and_falls_back_only_to_a_file_that_may_answer(echo: str) -> None:
    calls: list[str] = []

    def call(client: AdminClient) -> object:
        calls.append(client.url)
        return client.get_json("/echo")

    assert ask_daemon(_db_args("--db", "kept.duckdb"), call) is None and calls == []
    assert ask_daemon(_db_args("--admin", echo), call) == {"authorization": None, "method": "GET", "body": ""}
    nobody = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(NothingAnswers) as info:
        ask_daemon(_db_args("--admin", nobody), call)
    assert str(info.value).startswith(f"nothing answers at {nobody} (") and "--db PATH" in str(info.value)
    assert ask_daemon(_db_args("--admin", nobody, "--db", "kept.duckdb"), call) is None  # both named: the file next
    assert calls == [echo, nobody, nobody]


def test_the_file_answering_in_place_of_a_daemon_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(StoreSettings(str(tmp_path / "evaluator.duckdb")))
    store.start()
    store.shutdown()
    monkeypatch.chdir(tmp_path)
    nobody = f"http://127.0.0.1:{_free_port()}"
    for argv, note in (
            ((), "otel-evaluator: no daemon answers at http://127.0.0.1:13133; reading ./evaluator.duckdb "
                 "(read-only)\n"),
            (("--admin", nobody, "--db", "evaluator.duckdb"),
             f"otel-evaluator: no daemon answers at {nobody}; reading evaluator.duckdb (read-only)\n"),
            (("--db", "evaluator.duckdb"), "")):  # the file asked for: nothing to say
        err = io.StringIO()
        open_file_store(_db_args(*argv), err).shutdown()
        assert err.getvalue() == note, argv


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "evaluator", *argv], capture_output=True, text=True, timeout=60,
                          cwd=cwd)


def test_an_admin_given_where_nothing_answers_never_reads_a_file(tmp_path: Path) -> None:
    """ladder, sql and export with --admin and nothing there: exit 2 and say so, although ./evaluator.duckdb (an
    old store) is right there to be read."""
    store = Store(StoreSettings(str(tmp_path / "evaluator.duckdb")))
    store.start()
    store.shutdown()
    nobody = f"http://127.0.0.1:{_free_port()}"
    for argv in (("ladder", "--admin", nobody), ("sql", "--admin", nobody, "SELECT 1 AS one"),
                 ("export", "--admin", nobody, "--to", str(tmp_path / "out"))):
        result = _cli(*argv, cwd=tmp_path)
        assert result.returncode == 2 and result.stdout == "", (argv, result.stdout)
        assert result.stderr.startswith(f"otel-evaluator: nothing answers at {nobody} ("), (argv, result.stderr)
    assert not (tmp_path / "out").exists()
    # the same with --db as well: the user named the file, which answers, and stderr says which source answered
    result = _cli("sql", "--admin", nobody, "--db", "evaluator.duckdb", "--format", "csv", "SELECT 1 AS one",
                  cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == "one\n1\n"
    assert result.stderr == f"otel-evaluator: no daemon answers at {nobody}; reading evaluator.duckdb (read-only)\n"
