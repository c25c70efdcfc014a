"""The admin client the CLI commands use: token sources, and telling "nothing answers" from "answered: no"."""

from __future__ import annotations

import argparse
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from evaluator.admin.client import (
    TOKEN_ENV,
    AdminClient,
    AdminError,
    AdminUnavailable,
    add_admin_arguments,
    ask_daemon,
    client_from_args,
    source_choice,
)
from evaluator.httpbase import HttpServer, Request, Response, text


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    with pytest.raises(AdminUnavailable, match="no daemon answering"):
        AdminClient(f"http://127.0.0.1:{free}", timeout=2).get_json("/ladder")


def test_a_401_says_how_to_pass_a_token(echo: str) -> None:
    with pytest.raises(AdminError, match=f"--token-file FILE or the {TOKEN_ENV} variable"):
        AdminClient(echo).get_json("/locked")
    with pytest.raises(AdminError, match="the token was refused"):
        AdminClient(echo, token="wrong").get_json("/locked")


def test_db_without_admin_means_that_file_only() -> None:
    """ladder, sql and export: a --db given alone is read as is, never mixed up with a live daemon's store."""
    def args(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        add_admin_arguments(parser)
        parser.add_argument("--db")
        return parser.parse_args(list(argv))

    assert source_choice(args()) == (False, "./evaluator.duckdb")
    assert source_choice(args("--db", "kept.duckdb")) == (True, "kept.duckdb")
    assert source_choice(args("--db", "kept.duckdb", "--admin", "http://h:1")) == (False, "kept.duckdb")


def test_ask_daemon_does_not_ask_with_db_alone_and_falls_back_when_nothing_answers(echo: str) -> None:
    def args(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        add_admin_arguments(parser)
        parser.add_argument("--db")
        return parser.parse_args(list(argv))

    calls: list[str] = []

    def call(client: AdminClient) -> object:
        calls.append(client.url)
        return client.get_json("/echo")

    assert ask_daemon(args("--db", "kept.duckdb"), call) is None and calls == []
    assert ask_daemon(args("--admin", echo), call) == {"authorization": None, "method": "GET", "body": ""}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert ask_daemon(args("--admin", f"http://127.0.0.1:{free}"), call) is None
    assert calls == [echo, f"http://127.0.0.1:{free}"]
