r"""The container images and Kubernetes manifests (deploy/) agree with the server's CLI.

No Docker engine or cluster is needed: the Dockerfiles and YAML files are parsed and checked for
what can go wrong silently -- a flag or environment variable the server does not have, a probe on
the wrong port or health service, a grace period longer than the pod's termination grace, a
selector that matches nothing. PyYAML is not a dependency: the manifests are written in a small
YAML subset (block mappings and sequences, scalars, ``{}``) that :func:`parse_yaml` reads; when
PyYAML is installed the two readers are also compared.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import pytest

from loss_service.protocol import SERVICE_NAME as READINESS_SERVICE
from loss_service.server.config import ENVIRONMENT

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "deploy" / "docker"
K8S = ROOT / "deploy" / "k8s"
PORT = 50051
HEALTH_PORT = 50052
METRICS_PORT = 9464


# ---------------------------------------------------------------------------------------------
# A reader for the YAML subset the manifests use


def _scalar(text: str):
    if text.startswith('"'):
        return json.loads(text)
    if text.startswith("'"):
        if not text.endswith("'") or len(text) < 2:
            raise ValueError(f"unterminated single-quoted scalar: {text}")
        return text[1:-1].replace("''", "'")
    if text == "{}":
        return {}
    if text == "[]":
        return []
    if text[0] in "{[&*!|>":
        raise ValueError(f"unsupported YAML construct (flow collection, anchor, tag or block scalar): {text}")
    if text in ("true", "false"):
        return text == "true"
    if text in ("null", "~"):
        return None
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if re.fullmatch(r"-?\d+\.\d*(e-?\d+)?", text):
        return float(text)
    return text


def _strip_comment(line: str) -> str:
    quote = None
    for index, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1] in " \t"):
            return line[:index].rstrip()
    return line.rstrip()


def _split_key(content: str):
    r"""``(key, rest)`` for ``key: rest`` / ``key:``; ``None`` if the line is not a mapping entry."""
    match = re.match(r"^([A-Za-z0-9_.\-/]+):(?: (.*))?$", content)
    if not match:
        return None
    return match.group(1), (match.group(2) or "").strip()


def _parse_block(lines, index, indent):
    if lines[index][1].startswith("- ") or lines[index][1] == "-":
        return _parse_sequence(lines, index, indent)
    return _parse_mapping(lines, index, indent)


def _parse_value(lines, index, indent, rest, owner):
    r"""The value after ``key:`` or ``-``: inline scalar, or a nested block on the next lines."""
    if rest:
        return _scalar(rest), index + 1
    if index + 1 < len(lines) and lines[index + 1][0] > indent:
        return _parse_block(lines, index + 1, lines[index + 1][0])
    return None, index + 1


def _parse_mapping(lines, index, indent):
    mapping = {}
    while index < len(lines) and lines[index][0] == indent:
        entry = _split_key(lines[index][1])
        if entry is None:
            raise ValueError(f"line {lines[index][2]}: expected 'key: value', got {lines[index][1]!r}")
        key, rest = entry
        if key in mapping:
            raise ValueError(f"line {lines[index][2]}: duplicate key {key!r}")
        mapping[key], index = _parse_value(lines, index, indent, rest, key)
    if index < len(lines) and lines[index][0] > indent:
        raise ValueError(f"line {lines[index][2]}: unexpected indentation")
    return mapping, index


def _parse_sequence(lines, index, indent):
    items = []
    while index < len(lines) and lines[index][0] == indent and (lines[index][1].startswith("- ") or lines[index][1] == "-"):
        rest = lines[index][1][1:].strip()
        if rest and _split_key(rest) is not None and not rest.startswith(('"', "'")):
            # "- key: value": a mapping whose entries are indented to the first key.
            lines[index] = (indent + 2, rest, lines[index][2])
            item, index = _parse_mapping(lines, index, indent + 2)
        else:
            item, index = _parse_value(lines, index, indent, rest, "-")
        items.append(item)
    return items, index


def parse_yaml(text: str):
    r"""The documents of ``text`` (a YAML subset); ``ValueError`` with the line on anything else."""
    documents, lines = [], []
    for number, raw in enumerate(text.splitlines() + ["---"], start=1):
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ValueError(f"line {number}: tab in indentation")
        if raw.strip() == "---":
            if lines:
                value, end = _parse_block(lines, 0, lines[0][0])
                if end != len(lines):
                    raise ValueError(f"line {lines[end][2]}: unexpected content")
                documents.append(value)
            lines = []
            continue
        content = _strip_comment(raw)
        if content.strip():
            lines.append((len(content) - len(content.lstrip()), content.strip(), number))
    return documents


def test_parse_yaml_reads_the_subset_and_rejects_the_rest():
    text = 'a: 1\nb:\n  - x: "0.0.0.0"  # comment\n    y: [] \n  - two\nc: {}\nd: true\n---\ne: 2.5\n'
    assert parse_yaml(text) == [{"a": 1, "b": [{"x": "0.0.0.0", "y": []}, "two"], "c": {}, "d": True}, {"e": 2.5}]
    for bad in ("a: [1, 2]\n", "a: 1\na: 2\n", "a:\n  b: 1\n c: 2\n", "a: |\n  text\n"):
        with pytest.raises(ValueError):
            parse_yaml(bad)


# ---------------------------------------------------------------------------------------------
# Kubernetes manifests


def _manifests():
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        documents = parse_yaml(path.read_text())
        assert documents, f"{path.name} is empty"
        for document in documents:
            assert isinstance(document, dict) and "kind" in document and "apiVersion" in document, path.name
            out[(document["kind"], document["metadata"]["name"] if "metadata" in document else path.stem)] = document
    return out


MANIFESTS = _manifests()
DEPLOYMENTS = {name: doc for (kind, name), doc in MANIFESTS.items() if kind == "Deployment"}
CONFIG = MANIFESTS[("ConfigMap", "loss-service")]["data"]


@functools.lru_cache(maxsize=1)
def _serve_help():
    # One interpreter start (it imports torch) for all the tests that need the flags.
    result = subprocess.run([sys.executable, "-m", "loss_service", "serve", "--help"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    return result.returncode, result.stdout, result.stderr


def _serve_flags():
    r"""The flags of ``python -m loss_service serve``, read from its ``--help``."""
    returncode, stdout, stderr = _serve_help()
    assert returncode == 0, f"`python -m loss_service serve --help` failed: {stderr.strip() or 'no output'}"
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", stdout))


def test_manifests_parse_with_pyyaml_too():
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed; the subset reader is checked on its own")
    for path in sorted(K8S.glob("*.yaml")):
        assert [d for d in yaml.safe_load_all(path.read_text()) if d is not None] == parse_yaml(path.read_text()), path.name


def test_kustomization_lists_existing_files():
    kustomization = MANIFESTS[("Kustomization", "kustomization")]
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource


def test_configmap_sets_only_variables_the_server_reads():
    known = set(ENVIRONMENT.values())
    unknown = sorted(set(CONFIG) - known)
    assert not unknown, f"ConfigMap sets variables the server does not read: {unknown} (known: {sorted(known)})"
    assert all(isinstance(value, str) for value in CONFIG.values()), "ConfigMap data values must be strings"
    assert CONFIG["LOSS_SERVICE_HOST"] == "0.0.0.0"
    assert int(CONFIG["LOSS_SERVICE_PORT"]) == PORT


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_deployment_probes_ports_and_grace(name):
    deployment = DEPLOYMENTS[name]
    template = deployment["spec"]["template"]
    pod = template["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert {"configMapRef": {"name": "loss-service"}} in container["envFrom"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": PORT, "health": HEALTH_PORT, "metrics": METRICS_PORT}
    assert int(CONFIG["LOSS_SERVICE_HEALTH_PORT"]) == HEALTH_PORT
    assert int(CONFIG["LOSS_SERVICE_METRICS_PORT"]) == METRICS_PORT and CONFIG["LOSS_SERVICE_METRICS_HOST"] == "0.0.0.0"
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == METRICS_PORT
    # The kubelet's gRPC probes speak neither TLS nor tokens: they use the plaintext health port.
    for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container[probe_name]
        assert probe["grpc"]["port"] == HEALTH_PORT, probe_name
        assert probe["timeoutSeconds"] >= 5, f"{probe_name}: a saturated node answers slower than the 1 s default"
    assert container["readinessProbe"]["grpc"]["service"] == READINESS_SERVICE
    assert container["livenessProbe"]["grpc"].get("service", "") == "", "liveness is the server's '' health status"
    # The pod must outlive the server's graceful stop, whichever grace setting applies.
    grace = float(CONFIG["LOSS_SERVICE_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > grace
    assert "lifecycle" not in container, "no preStop hook: grpc.aio stops gracefully on SIGTERM"
    args = container["args"]
    assert args[args.index("--host") + 1] == "0.0.0.0"
    # Reachable from the cluster: TLS and tokens from mounted Secrets, never --insecure.
    assert "--insecure" not in args
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    secrets = {volume["name"]: volume["secret"]["secretName"] for volume in pod["volumes"] if "secret" in volume}
    for variable in ("LOSS_SERVICE_TLS_CERT", "LOSS_SERVICE_TLS_KEY", "LOSS_SERVICE_TOKEN_FILE"):
        volume = next(name for name, path in mounts.items() if CONFIG[variable].startswith(path + "/"))
        assert volume in secrets, f"{variable} is not read from a Secret"
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    resources = container["resources"]
    assert "cpu" in resources["requests"] and "memory" in resources["limits"]
    if "gpu" in name:
        assert resources["limits"]["nvidia.com/gpu"] == 1
        assert args[args.index("--device") + 1] == "auto"
    else:
        assert "nvidia.com/gpu" not in resources["limits"]


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_deployment_args_are_serve_flags(name):
    flags = _serve_flags()
    (container,) = DEPLOYMENTS[name]["spec"]["template"]["spec"]["containers"]
    used = {arg for arg in container["args"] if arg.startswith("--")}
    assert used <= flags, f"{name} passes flags the server does not have: {sorted(used - flags)}"


def test_service_pdb_and_hpa_select_the_deployments():
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in DEPLOYMENTS.values()]
    for name in ("loss-service", "loss-service-headless"):
        service = MANIFESTS[("Service", name)]
        (port,) = service["spec"]["ports"]
        assert port["port"] == PORT and port["targetPort"] == "grpc"
        assert all(service["spec"]["selector"].items() <= labels.items() for labels in pod_labels)
    # Client-side balancing (LossClient with dns:///loss-service-headless...): DNS answers every ready pod.
    headless = MANIFESTS[("Service", "loss-service-headless")]["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is False
    budgets = [doc for (kind, _), doc in MANIFESTS.items() if kind == "PodDisruptionBudget"]
    for deployment in DEPLOYMENTS.values():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, f"{deployment['metadata']['name']} is covered by {len(covering)} budgets"
    hpa = MANIFESTS[("HorizontalPodAutoscaler", "loss-service")]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) in {("Deployment", name) for name in DEPLOYMENTS}
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]


# ---------------------------------------------------------------------------------------------
# Dockerfiles


def _instructions(path: Path):
    r"""``[(INSTRUCTION, arguments)]`` with line continuations joined and comments dropped."""
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, arguments = line.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, f"{path.name} ends with a line continuation"
    return instructions


DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "gpu": DOCKER / "Dockerfile.gpu"}


def _exec_form(instructions, keyword):
    values = [arguments for name, arguments in instructions if name == keyword]
    assert len(values) == 1, f"expected one {keyword}"
    return json.loads(values[0])


def _env(instructions):
    env = {}
    for name, arguments in instructions:
        if name == "ENV":
            for token in shlex.split(arguments):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def _copy_sources(instructions):
    return [source for name, arguments in instructions if name == "COPY" for source in arguments.split()[:-1]]


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_runs_the_server_as_a_non_root_user(variant):
    instructions = _instructions(DOCKERFILES[variant])
    keywords = [name for name, _ in instructions]
    assert keywords[0] in ("FROM", "ARG")
    assert _exec_form(instructions, "ENTRYPOINT") == ["python", "-m", "loss_service", "serve"]
    command = _exec_form(instructions, "CMD")
    assert command[command.index("--host") + 1] == "0.0.0.0"
    if variant == "gpu":
        assert command[command.index("--device") + 1] == "auto"
    assert ("EXPOSE", str(PORT)) in instructions and ("EXPOSE", str(HEALTH_PORT)) in instructions
    user = [arguments for name, arguments in instructions if name == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN"), "RUN steps after USER"
    runs = " ".join(arguments for name, arguments in instructions if name == "RUN")
    assert "python -m loss_service.export --out" in runs, "artifacts are baked in at build time"
    pinned = re.search(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert f"torch=={pinned}" in runs, "the image's torch is the tested version"
    if variant == "cpu":
        assert "download.pytorch.org/whl/cpu" in runs
    healthcheck = [arguments for name, arguments in instructions if name == "HEALTHCHECK"]
    assert healthcheck and "/app/healthcheck.py" in healthcheck[0]
    copied = _copy_sources(instructions)
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), f"COPY source {source} does not exist in the repository"
    env = _env(instructions)
    assert int(env["LOSS_SERVICE_PORT"]) == PORT
    # healthcheck.py asks the plaintext health port, which answers whatever TLS and tokens the port has.
    assert int(env["LOSS_SERVICE_HEALTH_PORT"]) == HEALTH_PORT
    # `docker stop` kills 10 s after SIGTERM.
    assert float(env["LOSS_SERVICE_GRACE_SECONDS"]) < 10


def _dockerignore_patterns():
    lines = (line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _dockerignore_regex(pattern: str) -> re.Pattern:
    r"""Docker's reading of the pattern forms .dockerignore uses: ``*`` within a name, ``**/`` any folders."""
    assert not set(pattern) & set("!?[]\\"), f".dockerignore: {pattern!r} uses syntax this matcher does not read"
    text, regex = pattern.strip("/"), ""
    while text:
        if text.startswith("**/"):
            regex, text = regex + "(?:.*/)?", text[3:]
        elif text.startswith("*"):
            regex, text = regex + "[^/]*", text[1:]
        else:
            regex, text = regex + re.escape(text[0]), text[1:]
    return re.compile(regex)


def dockerignored(path: str, patterns) -> bool:
    r"""Whether the build context leaves ``path`` (from the root) out: a pattern matches it or a folder above it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
    return any(_dockerignore_regex(pattern).fullmatch(prefix) for pattern in patterns for prefix in prefixes)


def test_dockerignore_matcher():
    patterns = ["build", "deploy/cpp/build", "**/__pycache__", "**/*.pyc", "**/*.egg-info"]
    for left_out in ("build", "build/lib/x.py", "deploy/cpp/build/CMakeCache.txt", "__pycache__/a.pyc",
                     "loss_service/server/__pycache__/app.cpython-311.pyc", "loss_service/export/x.pyc", "loss_service.egg-info/PKG-INFO"):
        assert dockerignored(left_out, patterns), left_out
    for kept in ("loss_service/build.py", "deploy/build", "deploy/cpp/loss_trainer.cpp", "x.pyc.txt", "rebuild"):
        assert not dockerignored(kept, patterns), kept


def test_dockerignore_leaves_out_the_heavy_folders_and_nothing_the_images_copy():
    patterns = _dockerignore_patterns()
    for heavy in (".git/HEAD", ".venv/bin/python", "artifacts/manifest.json", "deploy/cpp/build/loss_trainer",
                  "loss_service/__pycache__/client.cpython-311.pyc"):
        assert dockerignored(heavy, patterns), f".dockerignore sends {heavy} to the Docker daemon"
    sources = sorted({source for path in DOCKERFILES.values() for source in _copy_sources(_instructions(path))})
    for source in sources:
        tracked = subprocess.run(["git", "ls-files", "--", source], capture_output=True, text=True, cwd=ROOT,
                                 check=True).stdout.split()
        assert tracked, f"COPY source {source} is not in the repository"
        left_out = [path for path in tracked if dockerignored(path, patterns)]
        assert not left_out, f".dockerignore leaves out what the images COPY: {left_out}"


@functools.lru_cache(maxsize=1)
def _export_flags():
    result = subprocess.run([sys.executable, "-m", "loss_service.export", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", result.stdout))


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_export_step_uses_real_flags(variant):
    instructions = _instructions(DOCKERFILES[variant])
    (command,) = [arguments for name, arguments in instructions if name == "RUN" and "python -m loss_service.export" in arguments]
    arguments = shlex.split(command.split("python -m loss_service.export", 1)[1].split("&&", 1)[0])
    used = {arg for arg in arguments if arg.startswith("--")}
    assert used <= _export_flags(), f"unknown python -m loss_service.export flags: {sorted(used - _export_flags())}"
    out = arguments[arguments.index("--out") + 1]
    assert out == _env(instructions)["LOSS_SERVICE_ARTIFACTS"], "the server reads the artifacts the build wrote"


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_flags_and_environment_exist(variant):
    instructions = _instructions(DOCKERFILES[variant])
    known = set(ENVIRONMENT.values())
    used_env = {key for key in _env(instructions) if key.startswith("LOSS_SERVICE_")}
    assert used_env <= known, f"unknown variables: {sorted(used_env - known)}"
    flags = _serve_flags()
    used = {arg for arg in _exec_form(instructions, "CMD") if arg.startswith("--")}
    assert used <= flags, f"CMD passes flags the server does not have: {sorted(used - flags)}"


# ---------------------------------------------------------------------------------------------
# The Docker HEALTHCHECK script


def test_healthcheck_reports_the_readiness_status():
    grpc = pytest.importorskip("grpc")
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    spec = importlib.util.spec_from_file_location("docker_healthcheck", DOCKER / "healthcheck.py")
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set(READINESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        assert healthcheck.main(["--port", str(port)]) == 0
        servicer.set(READINESS_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert healthcheck.main(["--port", str(port)]) == 1
    finally:
        server.stop(None)
    # Nothing listening any more.
    assert healthcheck.main(["--port", str(port), "--timeout", "0.5"]) == 1
