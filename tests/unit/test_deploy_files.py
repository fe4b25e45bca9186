"""The deployment files, checked without a Docker engine or a cluster.

Dockerfile, docker-compose.yml, .env.example, deploy/kubernetes and deploy/systemd must parse;
every gptqd command they run must exist in the installed CLI (and the API and worker commands
must really start here, outside Docker, and pass the healthchecks the files define); every
GPTQD_* variable they set must be a setting that app.settings reads; and the volumes must be
mounted where those settings make gptqd write.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from pydantic import AliasChoices
from sqlalchemy.engine import make_url

from app.box import free_port, spawn, stop
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
SYSTEMD = ROOT / "deploy" / "systemd"
VENV_BIN = Path(sys.executable).parent
REDIS_URL = "redis://127.0.0.1:6379/12"  # db 12: away from db 0 and the service tests' db 11
OUR_IMAGE = "gptqd"  # the image name the k8s manifests use (kustomization `images` maps it)
# Variables our files set on gptqd processes that are read by libraries, not by app.settings.
LIBRARY_ENV = {"HF_HOME", "CUDA_VISIBLE_DEVICES"}


# --- readers ------------------------------------------------------------------------------


class ComposeLoader(yaml.SafeLoader):
    """YAML as compose reads it (merge keys included); compose's !reset/!override tags too."""


def _plain(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    return loader.construct_scalar(node)


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _plain)


def dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (comments and blank lines skipped), as compose and systemd read them."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: {line!r} is not KEY=VALUE"
            out[key.strip()] = value.strip()
    return out


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR:+alt}, nesting, $$."""
    out, i = [], 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
        elif text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            depth, j = 1, i + 2
            while depth:
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            expr = text[i + 2 : j - 1]
            m = re.fullmatch(r"([A-Za-z_]\w*)(?:(:?[-?+])(.*))?", expr, re.S)
            assert m, f"bad interpolation ${{{expr}}}"
            name, op, arg = m.groups()
            value = env.get(name)
            missing = not value if op and op.startswith(":") else value is None
            if op in (":-", "-"):
                out.append(interpolate(arg, env) if missing else value)
            elif op in (":?", "?"):
                assert not missing, f"${{{name}}} is required: {arg}"
                out.append(value)
            elif op in (":+", "+"):
                out.append("" if missing else interpolate(arg, env))
            else:
                out.append(value or "")
            i = j
        else:
            m = re.match(r"\$([A-Za-z_]\w*)", text[i:])
            out.append(env.get(m.group(1), "") if m else "$")
            i += m.end() if m else 1
    return "".join(out)


def resolve(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(v, env) for v in node]
    if isinstance(node, dict):
        return {k: resolve(v, env) for k, v in node.items()}
    return node


def compose_raw() -> dict:
    return yaml.load((ROOT / "docker-compose.yml").read_text(), Loader=ComposeLoader)


def env_example() -> dict[str, str]:
    return dotenv(ROOT / ".env.example")


def compose() -> dict:
    """docker-compose.yml as `docker compose` sees it with .env copied from .env.example."""
    return resolve(compose_raw(), env_example())


def ours(services: dict) -> dict[str, dict]:
    """The services that run the gptqd image (built from this repo)."""
    return {name: svc for name, svc in services.items() if "build" in svc}


def workers(services: dict) -> dict[str, dict]:
    return {n: s for n, s in ours(services).items() if s["command"][:2] == ["gptqd", "worker"]}


def service_env(svc: dict) -> dict[str, str]:
    """A container's environment: its env_file (.env from .env.example), then `environment`."""
    env = env_example() if svc.get("env_file") else {}
    raw = svc.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.partition("=")[::2] for item in raw)
    return {**env, **{k: str(v) for k, v in raw.items()}}


def mounts(svc: dict) -> dict[str, str]:
    """Container path -> source (volume name or host path) of a compose service."""
    out = {}
    for item in svc.get("volumes", []):
        source, target = item.split(":")[:2]
        out[target] = source
    return out


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, buf = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") and not buf:
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            lines.append((word.upper(), rest.strip()))
        buf = ""
    return lines


def docker_args() -> dict[str, str]:
    return dict(rest.partition("=")[::2] for word, rest in dockerfile() if word == "ARG")


def docker_env() -> dict[str, str]:
    out = {}
    for word, rest in dockerfile():
        if word == "ENV":
            out.update(item.split("=", 1) for item in shlex.split(rest))
    return out


def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def k8s_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == kind}


def k8s_containers() -> list[dict]:
    out = []
    for kind in ("Deployment", "StatefulSet"):
        for doc in k8s_kind(kind).values():
            spec = doc["spec"]["template"]["spec"]
            out += [{**c, "_pod": spec} for c in spec["containers"]]
    return out


def gptqd_containers() -> list[dict]:
    return [c for c in k8s_containers() if c["image"] == OUR_IMAGE]


def k8s_env(container: dict) -> dict[str, str]:
    """The env a container gets from its ConfigMap/Secret (example values) and env entries."""
    configmaps = k8s_kind("ConfigMap")
    secret = dotenv(K8S / "secrets.env.example")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]]["data"])
        else:
            assert source["secretRef"]["name"] == "gptqd-secrets"
            env.update(secret)
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "<from secret>")
    return env


def systemd_units() -> dict[str, configparser.ConfigParser]:
    units = {}
    for path in sorted(SYSTEMD.glob("*.service")):
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # systemd keys are case-sensitive
        parser.read_string(path.read_text())
        units[path.name] = parser
    return units


def systemd_env(unit: configparser.ConfigParser) -> dict[str, str]:
    env = dotenv(SYSTEMD / "gptqd.env.example")
    assert unit["Service"]["EnvironmentFile"] == "/etc/gptqd/gptqd.env"
    text = unit["Service"].get("Environment", "")
    env.update(item.split("=", 1) for item in shlex.split(text))
    return env


# --- what the settings read ----------------------------------------------------------------


def settings_env_names() -> set[str]:
    """Every environment variable name app.settings.Settings reads (upper case)."""
    prefix = Settings.model_config.get("env_prefix", "")
    names = set()
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {str(choice).upper() for choice in alias.choices}
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{field_name}".upper())
    return names


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings exactly as a process with this environment (and no other GPTQD_*) builds them."""
    for key in list(os.environ):
        if key.upper().startswith("GPTQD_") or key.upper() == "HF_TOKEN":
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def compose_only() -> set[str]:
    """.env.example names meant for compose itself; env_file hands them to containers too."""
    return {key for key in env_example() if key.upper() not in settings_env_names()}


def check_env_names(where: str, env: dict[str, str], others: frozenset[str] = frozenset()) -> None:
    """Every variable is one the settings read, one a library reads, or one of `others`."""
    known = settings_env_names()
    for key in env:
        if key.upper().startswith("GPTQD_") or key.upper() in known:
            assert key.upper() in known, f"{where} sets {key}, which app.settings does not read"
        else:
            assert key in LIBRARY_ENV | others, f"{where} sets {key}, which nothing reads"


def written_paths(settings: Settings) -> list[Path]:
    """Where gptqd writes: the data dir and everything under it, the models root, SQLite."""
    paths = [settings.data_dir, settings.artifacts_dir, settings.datasets_dir,
             settings.models_root]
    url = make_url(settings.store_url)
    if url.get_backend_name() == "sqlite":
        paths.append(Path(url.database))
    return paths


def is_under(path: Path | str, roots: list[str]) -> bool:
    p = PurePosixPath(str(path))
    return any(p == PurePosixPath(r) or PurePosixPath(r) in p.parents for r in roots)


# --- commands -------------------------------------------------------------------------------


def local(argv: list[str]) -> list[str]:
    """The same command from this venv: gptqd, celery and python are its console scripts."""
    name = PurePosixPath(argv[0]).name
    assert argv[0] in {name, f"/opt/gptqd/venv/bin/{name}"}, f"unexpected program {argv[0]}"
    path = VENV_BIN / name
    assert path.exists(), f"{name} is not installed in {VENV_BIN}"
    return [str(path), *argv[1:]]


def gptqd_commands() -> dict[str, list[str]]:
    """Every gptqd command the deployment files run, by where it comes from."""
    cmds = {}
    for word, rest in dockerfile():
        if word == "CMD":
            cmds["Dockerfile CMD"] = json.loads(rest)
    for name, svc in ours(compose()["services"]).items():
        cmds[f"compose {name}"] = svc["command"]
    for c in gptqd_containers():
        cmds[f"k8s {c['name']}"] = c.get("command", []) + c.get("args", [])
    for name, unit in systemd_units().items():
        cmds[f"systemd {name}"] = shlex.split(unit["Service"]["ExecStart"].replace("%i", "0"))
    return cmds


def redis_or_fail() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL} (scripts/run-tests.sh starts it): {exc}")


def shell_test(test: list[str]) -> list[str]:
    """A compose healthcheck `test` as an argv for this machine."""
    if test[0] == "CMD-SHELL":
        return ["sh", "-c", test[1]]
    assert test[0] == "CMD", test
    return local(test[1:])


def process_env(extra: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("GPTQD_")}
    return {**base, "PATH": f"{VENV_BIN}{os.pathsep}{base.get('PATH', '')}", **extra}


def local_env(container_env: dict[str, str], tmp: Path, **extra: str) -> dict[str, str]:
    """The container's GPTQD_* environment, with its paths and servers moved to this machine."""
    env = {k: v for k, v in container_env.items() if k.startswith("GPTQD_") or k == "HF_TOKEN"}
    env.update(GPTQD_DATA_DIR=str(tmp / "data"), HF_HOME=str(tmp / "hf"),
               GPTQD_DATABASE_URL="", GPTQD_BROKER_URL=REDIS_URL, GPTQD_DEVICE="cpu",
               GPTQD_QUEUE=f"deploy-test-{uuid.uuid4().hex[:8]}", **extra)
    return process_env(env)


# --- every file parses ------------------------------------------------------------------------


def test_every_deployment_file_parses() -> None:
    assert set(compose()["services"]) >= {"redis", "postgres", "api", "worker", "flower"}
    paths = sorted((ROOT / "deploy").rglob("*.y*ml"))
    assert len(paths) >= 8
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path
    for doc in k8s_docs():
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
    assert next(w for w, _ in dockerfile()) in {"ARG", "FROM"}
    assert len(systemd_units()) == 2
    for name, unit in systemd_units().items():
        assert {"Unit", "Service", "Install"} <= set(unit.sections()), name


# --- docker-compose.yml ----------------------------------------------------------------------


def test_compose_redis_postgres_and_flower() -> None:
    services = compose()["services"]
    redis_svc = services["redis"]
    assert redis_svc["command"][redis_svc["command"].index("--appendonly") + 1] == "yes"
    assert redis_svc["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "/data" in mounts(redis_svc)  # where redis writes its append-only file

    pg = services["postgres"]
    assert mounts(pg)["/var/lib/postgresql/data"] in compose()["volumes"]
    test = pg["healthcheck"]["test"]
    assert test[:2] == ["CMD", "pg_isready"]
    assert test[test.index("-U") + 1] == pg["environment"]["POSTGRES_USER"]
    assert test[test.index("-d") + 1] == pg["environment"]["POSTGRES_DB"]

    flower = services["flower"]
    assert flower["profiles"] == ["flower"]  # optional: only with --profile flower
    assert f"--broker={service_env(services['worker'])['GPTQD_BROKER_URL']}" in flower["command"]

    for name, svc in ours(services).items():
        for dep in ("redis", "postgres"):
            assert svc["depends_on"][dep]["condition"] == "service_healthy", name


def test_compose_api_serves_port_8000_with_a_healthz_check() -> None:
    api = compose()["services"]["api"]
    cmd = api["command"]
    port = cmd[cmd.index("--port") + 1]
    assert port == "8000" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert any(p.endswith(f":{port}") for p in api["ports"])
    assert f"127.0.0.1:{port}/healthz" in " ".join(api["healthcheck"]["test"])
    # the image's default command is the API's, so `docker run gptqd` serves the API too
    assert cmd == json.loads(dict(dockerfile())["CMD"])


def test_compose_workers_reserve_gpus_one_per_worker() -> None:
    services = compose()["services"]
    found = workers(services)
    assert "worker" in found and "profiles" not in found["worker"]  # started by a plain `up`
    gpus = []
    for name, svc in found.items():
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert svc["command"] == found["worker"]["command"], name
        gpus.append(service_env(svc)["CUDA_VISIBLE_DEVICES"])
        # a GPU worker whose CUDA does not work refuses to start instead of failing jobs
        assert service_env(svc)["GPTQD_DEVICE"] == "cuda", name
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL" and "inspect ping" in test[1], name
    assert gpus == sorted(set(gpus), key=int) and gpus[0] == "0", gpus  # one GPU each
    hostnames = [svc["hostname"] for svc in found.values()]
    assert len(set(hostnames)) == len(hostnames)  # Celery node names must differ


def test_compose_uses_env_file_and_named_volumes_exist() -> None:
    raw = compose_raw()
    data = compose()
    for name, svc in ours(raw["services"]).items():
        assert svc["env_file"] == ".env", name
    for name, svc in data["services"].items():
        for source in mounts(svc).values():
            if not source.startswith(("/", ".")):
                assert source in data["volumes"], f"{name} mounts undeclared volume {source}"
    # every compose-only variable of .env.example is used by the compose file
    text = (ROOT / "docker-compose.yml").read_text()
    for key in compose_only():
        assert re.search(rf"\$\{{{key}\b", text), f".env.example sets {key}, unused"


def test_compose_env_vars_are_settings_and_volumes_are_where_settings_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = compose()["services"]
    check_env_names(".env.example", env_example(), frozenset(compose_only()))
    shared: dict[str, set[str]] = {}
    for name, svc in ours(services).items():
        env = service_env(svc)
        check_env_names(f"compose {name}", env, frozenset(compose_only()))
        settings = settings_from(env, monkeypatch)
        targets = list(mounts(svc))
        for path in written_paths(settings):
            assert is_under(path, targets), f"compose {name}: gptqd writes {path}, not on a volume"
        assert env["HF_HOME"] in targets, f"compose {name}: HF_HOME is not a volume"
        for target in (str(settings.data_dir), env["HF_HOME"]):
            shared.setdefault(target, set()).add(mounts(svc)[target])
        # the values are ones the settings accept and mean what the box needs
        assert settings.broker == "redis://redis:6379/0"
        api_keys = settings.keys()
        assert len(api_keys) >= 2 and any(k.admin for k in api_keys)
        url = make_url(settings.store_url)
        pg_env = services["postgres"]["environment"]
        assert url.drivername == "postgresql+psycopg" and url.host == "postgres"
        assert (url.username, url.database) == (pg_env["POSTGRES_USER"], pg_env["POSTGRES_DB"])
        assert url.password == pg_env["POSTGRES_PASSWORD"]
        url.get_dialect().import_dbapi()  # the driver the URL names is installed
    # API and workers see one data volume and one model cache
    assert all(len(sources) == 1 for sources in shared.values()), shared


def test_compose_matches_the_compose_spec(tmp_path: Path) -> None:
    # compose validates after interpolation, so validate what `docker compose config` sees
    resolved = tmp_path / "compose.json"
    resolved.write_text(json.dumps(compose()))
    res = subprocess.run([str(VENV_BIN / "check-jsonschema"), "--builtin-schema",
                          "vendor.compose-spec", str(resolved)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_external_database_url_in_env_replaces_the_bundled_one() -> None:
    env = {**env_example(), "GPTQD_DATABASE_URL": "postgresql+psycopg://u:p@db.example:5432/x"}
    api = resolve(compose_raw(), env)["services"]["api"]
    assert service_env(api)["GPTQD_DATABASE_URL"] == env["GPTQD_DATABASE_URL"]


# --- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_user_healthcheck_volumes() -> None:
    steps = dockerfile()
    words = [w for w, _ in steps]
    users = [rest for w, rest in steps if w == "USER"]
    # numeric, so Kubernetes' runAsNonRoot can verify it; created by useradd with that uid
    assert users and users[-1] == "${GPTQD_UID}" and int(docker_args()["GPTQD_UID"]) > 0
    assert any(w == "RUN" and 'useradd --create-home --uid "${GPTQD_UID}"' in rest
               for w, rest in steps)

    health = dict(steps)["HEALTHCHECK"]
    cmd = json.loads(dict(steps)["CMD"])
    port = cmd[cmd.index("--port") + 1]
    assert f"127.0.0.1:{port}/healthz" in health and health.index("CMD") > 0
    assert port in dict(steps)["EXPOSE"].split()

    env = docker_env()
    volumes = set(json.loads(dict(steps)["VOLUME"]))
    assert volumes == {env["GPTQD_DATA_DIR"], env["HF_HOME"]}
    chown = next(rest for w, rest in steps if w == "RUN" and "chown" in rest)
    assert all(v in chown for v in volumes)  # the non-root user can write its volumes
    assert words.index("VOLUME") < words.index("USER") < words.index("CMD")


def test_dockerfile_installs_cuda_torch_before_the_project() -> None:
    steps = dockerfile()
    args = docker_args()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_req = next(Requirement(r) for r in pyproject["project"]["dependencies"]
                     if Requirement(r).name == "torch")
    assert Version(args["TORCH_VERSION"]) in torch_req.specifier
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu1\d\d", args["TORCH_INDEX_URL"])
    python = re.match(r"python:(\d+\.\d+)", args["PYTHON_IMAGE"])
    assert python and Version(python.group(1)) in \
        Requirement(f"x{pyproject['project']['requires-python']}").specifier

    runs = [rest for w, rest in steps if w == "RUN"]
    torch_i = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    assert '--index-url "${TORCH_INDEX_URL}"' in runs[torch_i]
    assert not any("pip install" in r for r in runs[:torch_i])  # torch is the first install
    project_i = next(i for i, r in enumerate(runs) if re.search(r"pip install .*\s\.(\s|$)", r))
    assert project_i > torch_i
    # every install after torch is held to the same torch by the constraint file
    assert "constraints.txt" in runs[torch_i]
    for r in runs[torch_i + 1 :]:
        if "pip install" in r:
            assert "-c /opt/gptqd/constraints.txt" in r, r
    assert "torch.version.cuda" in runs[project_i]  # the build fails on a CPU torch
    assert re.search(r"import [\w., ]*\btriton\b", runs[project_i])  # ... or one without triton


def test_dockerfile_passes_hadolint() -> None:
    res = subprocess.run([str(VENV_BIN / "hadolint"), "--failure-threshold", "info",
                          str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerignore_keeps_secrets_out_and_sources_in() -> None:
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".env", ".venv", "var", ".git", "deploy/kubernetes/secrets.env"} <= patterns
    for word, rest in dockerfile():
        if word == "COPY":
            for source in rest.split()[:-1]:
                assert source.rstrip("/") not in patterns, f"COPY {source} is ignored"
                assert (ROOT / source).exists(), f"COPY {source}: no such file"


# --- Kubernetes ------------------------------------------------------------------------------


def test_k8s_manifests_match_the_kubernetes_schema() -> None:
    version = kubernetes_validate.latest_version()
    for doc in k8s_docs():
        kubernetes_validate.validate(doc, version, strict=True)  # raises on an error


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files
    (gen,) = kust["secretGenerator"]
    assert gen["name"] == "gptqd-secrets" and gen["envs"] == ["secrets.env"]
    assert (K8S / "secrets.env.example").exists()
    assert "secrets.env" in (K8S / ".gitignore").read_text().split()


def test_k8s_api_worker_redis_postgres() -> None:
    deployments, services = k8s_kind("Deployment"), k8s_kind("Service")
    api = deployments["gptqd-api"]["spec"]["template"]["spec"]["containers"][0]
    port = api["command"][api["command"].index("--port") + 1]
    (container_port,) = api["ports"]
    assert str(container_port["containerPort"]) == port
    for probe in ("readinessProbe", "livenessProbe"):
        assert api[probe]["httpGet"]["path"] == "/healthz"
        assert api[probe]["httpGet"]["port"] == container_port["name"]
    svc = services["gptqd-api"]["spec"]
    assert svc["selector"] == deployments["gptqd-api"]["spec"]["template"]["metadata"]["labels"]
    assert svc["ports"][0]["targetPort"] == container_port["name"]

    worker = deployments["gptqd-worker"]["spec"]["template"]["spec"]
    (wc,) = worker["containers"]
    assert wc["command"][:2] == ["gptqd", "worker"]
    assert int(wc["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert deployments["gptqd-worker"]["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0

    sets = k8s_kind("StatefulSet")
    redis_c = sets["redis"]["spec"]["template"]["spec"]["containers"][0]
    assert redis_c["args"][redis_c["args"].index("--appendonly") + 1] == "yes"
    pg = sets["postgres"]["spec"]["template"]["spec"]["containers"][0]
    pg_env = {e["name"]: e for e in pg["env"]}
    secret = dotenv(K8S / "secrets.env.example")
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] in secret
    url = make_url(secret["GPTQD_DATABASE_URL"])
    assert url.host in services and url.port == services[url.host]["spec"]["ports"][0]["port"]
    assert (url.username, url.database, url.password) == (
        pg_env["POSTGRES_USER"]["value"], pg_env["POSTGRES_DB"]["value"],
        secret["POSTGRES_PASSWORD"])
    broker = k8s_kind("ConfigMap")["gptqd-config"]["data"]["GPTQD_BROKER_URL"]
    assert broker.split("//")[1].split(":")[0] in services
    for name, s in sets.items():
        assert s["spec"]["serviceName"] in services, name
    for key in ("GPTQD_API_KEYS", "HF_TOKEN", "GPTQD_DATABASE_URL"):
        assert key in secret  # secrets come from the Secret, never the ConfigMap
        assert key not in k8s_kind("ConfigMap")["gptqd-config"]["data"]


def test_k8s_env_vars_are_settings_and_volumes_are_where_settings_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    claims = k8s_kind("PersistentVolumeClaim")
    containers = gptqd_containers()
    assert {c["name"] for c in containers} == {"api", "worker"}
    shared: dict[str, set[str]] = {}
    for c in containers:
        env = k8s_env(c)
        check_env_names(f"k8s {c['name']}", env, frozenset({"POSTGRES_PASSWORD"}))
        settings = settings_from(env, monkeypatch)
        volumes = {v["name"]: v for v in c["_pod"]["volumes"]}
        targets = {}
        for m in c["volumeMounts"]:
            claim = volumes[m["name"]]["persistentVolumeClaim"]["claimName"]
            assert claim in claims, f"k8s {c['name']}: no PVC {claim}"
            targets[m["mountPath"]] = claim
        for path in written_paths(settings):
            assert is_under(path, list(targets)), f"k8s {c['name']}: {path} is not on a volume"
        assert env["HF_HOME"] in targets
        for target in (str(settings.data_dir), env["HF_HOME"]):
            shared.setdefault(target, set()).add(targets[target])
        api_keys = settings.keys()
        assert any(k.admin for k in api_keys)
        security = c["_pod"]["securityContext"]
        assert security["runAsNonRoot"] and security["runAsUser"] != 0
    assert all(len(v) == 1 for v in shared.values()), shared
    for name, claim in claims.items():
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], name  # api + workers share


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_with_the_example_secrets(tmp_path: Path) -> None:
    work = tmp_path / "k8s"
    shutil.copytree(K8S, work)
    shutil.copy(work / "secrets.env.example", work / "secrets.env")
    out = subprocess.run(["kubectl", "kustomize", str(work)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    assert re.fullmatch(r"gptqd-secrets-[a-z0-9]+", secret["metadata"]["name"])
    assert all(d["metadata"].get("namespace") == "gptqd" for d in docs if d["kind"] != "Namespace")
    # the hashed secret name reached every reference (envFrom and secretKeyRef)
    assert out.stdout.count(secret["metadata"]["name"]) == 4


# --- systemd ---------------------------------------------------------------------------------


def test_systemd_units_env_and_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    units = systemd_units()
    worker = units["gptqd-worker@.service"]["Service"]
    assert "CUDA_VISIBLE_DEVICES=%i" in worker["Environment"]
    assert "%i" in worker["ExecStart"]  # a distinct Celery node name per GPU
    for name, unit in units.items():
        service = unit["Service"]
        assert service["User"] not in {"root", "0"}, name
        env = systemd_env(unit)
        check_env_names(f"systemd {name}", env)
        settings = settings_from(env, monkeypatch)
        writable = service["ReadWritePaths"].split()
        for path in [*written_paths(settings), Path(env["HF_HOME"])]:
            assert is_under(path, writable), f"{name}: {path} is read-only (ProtectSystem)"
        assert service["WorkingDirectory"] == str(settings.data_dir)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    for path in SYSTEMD.glob("*.service"):
        text = path.read_text().replace("/opt/gptqd/venv/bin/", f"{VENV_BIN}/")
        (tmp_path / path.name.replace("@.", "@0.")).write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", *map(str, tmp_path.glob("*"))],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "gptqd" not in out.stderr, out.stderr


# --- docs/deploy.md --------------------------------------------------------------------------


def test_docs_cover_every_setting_and_their_compose_snippets_fit() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    for name in settings_env_names() | set(env_example()):
        assert f"`{name}`" in text, f"docs/deploy.md does not explain {name}"

    def exists(snippet: dict, model: dict, path: str) -> None:
        for key, value in snippet.items():
            assert key in model, f"docs/deploy.md snippet: {path}{key} is not in the compose file"
            if isinstance(value, dict) and value:
                exists(value, model[key], f"{path}{key}.")

    snippets = [yaml.load(s, Loader=ComposeLoader)
                for s in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    # Compose overrides; other tools' configs (Prometheus' scrape config) are not checked here
    compose_snippets = [s for s in snippets if "services" in s]
    assert compose_snippets
    for snippet in compose_snippets:
        exists(snippet, compose(), "")


# --- the commands exist and start ------------------------------------------------------------


def test_every_gptqd_command_exists() -> None:
    cmds = gptqd_commands()
    assert {"Dockerfile CMD", "compose api", "compose worker", "k8s api", "k8s worker",
            "systemd gptqd-api.service", "systemd gptqd-worker@.service"} <= set(cmds)
    for argv in {tuple(c) for c in cmds.values()}:
        # --help after the options: click still rejects an unknown subcommand or option
        res = subprocess.run([*local(list(argv)), "--help"], capture_output=True, text=True,
                             timeout=60, env=process_env({}))
        assert res.returncode == 0, f"{argv}: {res.stderr}"
        assert "Usage: gptqd" in res.stdout


@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[tuple[int, dict[str, str], Any]]:
    """The compose api command, started here with the compose env moved to local paths."""
    redis_or_fail()
    api = compose()["services"]["api"]
    port = free_port()
    argv = local(api["command"])
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--host") + 1] = "127.0.0.1"
    env = local_env(service_env(api), tmp_path)
    proc = spawn(argv, env, tmp_path / "api.log")
    yield port, env, proc
    stop(proc, timeout=10)


def test_compose_api_command_starts_and_passes_its_healthchecks(
    api_server: tuple[int, dict[str, str], Any], tmp_path: Path,
) -> None:
    port, env, proc = api_server
    deadline = time.monotonic() + 25
    while True:
        assert proc.poll() is None, (tmp_path / "api.log").read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "no /healthz answer in 25 s"
        time.sleep(0.2)
    ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json()
    assert ready["checks"] == {"store": "ok", "broker": "ok"}, ready
    # the server wrote where the settings say, i.e. onto the data volume in the container
    assert (Path(env["GPTQD_DATA_DIR"]) / "artifacts").is_dir()

    checks = {
        "compose": compose()["services"]["api"]["healthcheck"]["test"],
        "Dockerfile": ["CMD", *json.loads(dict(dockerfile())["HEALTHCHECK"].split(" CMD ", 1)[1])],
    }
    for where, test in checks.items():
        argv = [a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in shell_test(test)]
        res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=20)
        assert res.returncode == 0, f"{where} healthcheck failed: {res.stderr}"
    stop(proc, timeout=10)
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=20)
    assert res.returncode != 0, "the healthcheck passes with the API stopped"


def test_compose_worker_command_starts_one_slot_and_passes_its_healthcheck(
    tmp_path: Path,
) -> None:
    redis_or_fail()
    svc = compose()["services"]["worker"]
    # inside the container the hostname is the compose `hostname`; here it is this machine's
    env = local_env(service_env(svc), tmp_path, HOSTNAME=socket.gethostname())
    log = tmp_path / "worker.log"
    proc = spawn(local(svc["command"]), env, log)
    try:
        deadline = time.monotonic() + 40  # it imports torch and transformers before "ready"
        while " ready." not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        res = subprocess.run(shell_test(svc["healthcheck"]["test"]), env=env,
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stdout + res.stderr + log.read_text()
        node = f"worker@{socket.gethostname()}"

        def celery(*args: str) -> str:
            res = subprocess.run([str(VENV_BIN / "celery"), "-A", "worker.celery_app", *args,
                                  "--timeout", "10", "-d", node],
                                 env=env, capture_output=True, text=True, timeout=30)
            assert res.returncode == 0, res.stdout + res.stderr
            return res.stdout

        pool = json.loads(celery("inspect", "stats", "--json"))[node]["pool"]
        assert pool["max-concurrency"] == 1  # one job at a time per worker (per GPU)
        # the drain step of docs/deploy.md: stop taking jobs, keep the running one
        queues = [q["name"] for q in json.loads(celery("inspect", "active_queues", "--json"))[node]]
        assert queues == [env["GPTQD_QUEUE"]]
        celery("control", "cancel_consumer", env["GPTQD_QUEUE"])
        assert json.loads(celery("inspect", "active_queues", "--json"))[node] == []
    finally:
        stop(proc, timeout=15)
