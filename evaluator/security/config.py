"""The config file's `tls:` blocks (receivers.grpc, receivers.http, admin) and its `auth:` block, read with every
problem positioned like the rest of evaluator/config.py."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from evaluator.security.auth import AuthSettings, check_auth
from evaluator.security.tls import TlsSettings, check_tls
from evaluator.yamlsrc import Node, Problems, check_keys, read_map, read_str

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def read_tls(node: Node | None, key: str, problems: Problems, base: str = "") -> TlsSettings | None:
    """`key` is the block's dotted name (receivers.grpc.tls); relative paths are relative to `base` (the config
    file's folder). None when absent, null (no TLS) or invalid."""
    if node is not None and node.value is None:
        return None
    block = read_map(node, key, problems)
    if block is None:
        return None
    check_keys(block, {"cert_file", "key_file", "client_ca_file"}, problems, key)
    paths: dict[str, str | None] = {}
    for name in ("cert_file", "key_file", "client_ca_file"):
        value = read_str(block.get(name), f"{key}.{name}", problems)
        paths[name] = os.path.join(base, value) if value and base else value
    cert, tls_key, ca = paths["cert_file"], paths["key_file"], paths["client_ca_file"]
    if cert is None or tls_key is None:
        if block.get("cert_file") is None or block.get("key_file") is None:
            missing = "cert_file" if block.get("cert_file") is None else "key_file"
            problems.add(block, key, f"needs both cert_file and key_file ({missing} is missing)")
        return None
    settings = TlsSettings(cert, tls_key, ca)
    found = check_tls(settings)
    for name, why in found:
        problems.add(block.get(name) or block, f"{key}.{name}", why)
    return None if found else settings


def read_auth(node: Node | None, problems: Problems, environ: Mapping[str, str] | None = None,
              base: str = "") -> AuthSettings | None:
    """None when absent, null (no auth) or invalid."""
    if node is not None and node.value is None:
        return None
    block = read_map(node, "auth", problems)
    if block is None:
        return None
    check_keys(block, {"token_file", "token_env"}, problems, "auth")
    token_file = read_str(block.get("token_file"), "auth.token_file", problems)
    token_env = read_str(block.get("token_env"), "auth.token_env", problems)
    if (block.get("token_file") is None) == (block.get("token_env") is None):
        problems.add(block, "auth", "needs exactly one of token_file and token_env")
        return None
    if token_env is not None and not _ENV_NAME.match(token_env):
        problems.add(block.get("token_env"), "auth.token_env", f"{token_env!r} is not an environment variable name")
        return None
    if token_file is None and token_env is None:
        return None  # not a string: already reported
    if token_file is not None and base:
        token_file = os.path.join(base, token_file)
    settings = AuthSettings(token_file=token_file, token_env=token_env)
    found = check_auth(settings, environ)
    for name, why in found:
        problems.add(block.get(name) or block, f"auth.{name}", why)
    return None if found else settings
