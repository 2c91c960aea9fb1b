"""
The deployment artifacts for several replicas (CONTRACT §10), checked as data:
docker/compose.cluster.yaml (three RabbitMQ nodes, three listener replicas, a load
balancer) and deploy/kubernetes (a Deployment of three, its Service, PDB, ConfigMap).
Both listener configurations are also loaded by the project's own loader, with the
environment or the secret files their deployment gives them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml

from listener.config import parse_duration
from listener.config_loader import load_config

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.cluster.yaml"
CLUSTER_DIR = ROOT / "docker" / "cluster"
K8S = ROOT / "deploy" / "kubernetes"

WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ADMIN_KEY = "adm_" + "k" * 40
RABBITMQ_PASSWORD = "0123456789abcdef0123456789abcdef"

# An environment variable or a file whose name says it holds a secret.
SECRET_NAME = re.compile(r"PASS|SECRET|KEY|COOKIE|TOKEN|CREDENTIAL", re.IGNORECASE)
# A compose reference that ships no value: ${VAR}, ${VAR:?message}, ${VAR?message},
# or an empty fallback ${VAR:-}.
NO_VALUE_REFERENCE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?::?\?[^}]*|:?-)?\}$")
REQUIRED_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*):?\?[^}]*\}$")
COMPOSE_VARIABLE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}$")
CONFIG_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")
# The listener config keys that hold secrets when given inline.
SECRET_KEYS = {"key", "api_key", "secrets"}


# --- reading the files ---------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def services(kind: str) -> dict[str, dict[str, Any]]:
    """The compose services of one kind: rabbitmq, listener or loadbalancer."""
    found: dict[str, dict[str, Any]] = {}
    for name, service in compose()["services"].items():
        image = str(service.get("image", ""))
        build = service.get("build")
        if kind == "rabbitmq" and image.startswith("rabbitmq:"):
            found[name] = service
        elif kind == "listener" and isinstance(build, dict):
            if build.get("dockerfile") == "docker/Dockerfile":
                found[name] = service
        elif kind == "loadbalancer" and image.split(":", maxsplit=1)[0] in {"nginx", "haproxy"}:
            found[name] = service
    return found


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def mounts(service: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """A service's volumes as (source, target, read_only)."""
    out = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            out.append(
                (str(volume["source"]), str(volume["target"]), bool(volume.get("read_only")))
            )
            continue
        parts = str(volume).split(":")
        read_only = len(parts) > 2 and "ro" in parts[2].split(",")
        out.append((parts[0], parts[1], read_only))
    return out


def published(service: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """A service's published ports as (host address, host port, container port)."""
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out.append(
                (str(port.get("host_ip", "0.0.0.0")), int(port["published"]), int(port["target"]))
            )
            continue
        parts = str(port).split(":")
        address = parts[0] if len(parts) == 3 else "0.0.0.0"
        out.append((address, int(parts[-2]), int(parts[-1].split("/")[0])))
    return out


def bind_source(source: str) -> Path:
    """A compose bind mount's host path (relative to the compose file)."""
    return (COMPOSE.parent / source).resolve()


def cluster_config_raw() -> dict[str, Any]:
    data = load_yaml(CLUSTER_DIR / "config.yaml")
    assert isinstance(data, dict)
    return data


def rabbitmq_conf() -> dict[str, str]:
    settings = {}
    for raw_line in (CLUSTER_DIR / "rabbitmq.conf").read_text(encoding="utf-8").splitlines():
        line = raw_line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def dockerfile_volume() -> str:
    match = re.search(r"^VOLUME\s+(\[.*\])", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, "docker/Dockerfile declares the journal VOLUME"
    volumes = json.loads(match[1])
    assert len(volumes) == 1
    return str(volumes[0])


def dockerfile_entrypoint() -> list[str]:
    match = re.search(r"^ENTRYPOINT\s+(\[.*\])", DOCKERFILE.read_text(), re.MULTILINE)
    assert match
    return list(json.loads(match[1]))


def dockerfile_uid() -> int:
    match = re.search(r"useradd\b[^\n]*--uid\s+(\d+)", DOCKERFILE.read_text())
    assert match, "docker/Dockerfile creates its user with a fixed --uid"
    return int(match[1])


def manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object under deploy/kubernetes by kind (one of each expected)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                assert doc["kind"] not in found, f"a second {doc['kind']} in {path.name}"
                found[doc["kind"]] = doc
    return found


def pod_spec() -> dict[str, Any]:
    spec = manifests()["Deployment"]["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def k8s_config_raw() -> dict[str, Any]:
    data = load_yaml_text(manifests()["ConfigMap"]["data"]["config.yaml"])
    assert isinstance(data, dict)
    return data


def load_yaml_text(text: str) -> Any:
    return yaml.safe_load(text)


def container_port(port: int | str) -> int:
    """A probe's or a Service's target port, resolved through the container's named ports."""
    if isinstance(port, int):
        return port
    names = {p["name"]: p["containerPort"] for p in container().get("ports", []) if "name" in p}
    assert port in names, f"no container port named {port!r}"
    return int(names[port])


def volume_under(path: str, *, kind: str) -> dict[str, Any] | None:
    """The container's mount (with its volume) of ``kind`` (secret, configMap...) holding ``path``."""
    volumes = {v["name"]: v for v in pod_spec().get("volumes", [])}
    best = None
    for mount in container().get("volumeMounts", []):
        if PurePosixPath(path).is_relative_to(mount["mountPath"]) and (
            best is None or len(mount["mountPath"]) > len(best["mountPath"])
        ):
            best = {**mount, "volume": volumes[mount["name"]]}
    if best is None or kind not in best["volume"]:
        return None
    return best


def file_keys(node: Any, where: str = "") -> Iterator[tuple[str, str, str]]:
    """Every ``<key>_file`` of a config as (key path, key, one file path)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if str(key).endswith("_file"):
                for item in value if isinstance(value, list) else [value]:
                    yield f"{where}.{key}", str(key), str(item)
            else:
                yield from file_keys(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from file_keys(item, f"{where}[{i}]")


def inline_secrets(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """Every inline secret of a config (key, api_key, secrets) as (key path, value)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in SECRET_KEYS:
                yield f"{where}.{key}", value
            else:
                yield from inline_secrets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from inline_secrets(item, f"{where}[{i}]")


def strings(node: Any) -> Iterator[str]:
    """Every string value of a parsed YAML document (comments are not values)."""
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, str):
        yield node


def secret_text(value: Any) -> str:
    getter = getattr(value, "get_secret_value", None)
    return str(getter() if getter else value)


# --- compose: the RabbitMQ cluster ----------------------------------------------------


def test_compose_runs_three_rabbitmq_nodes_of_one_cluster() -> None:
    """Three official-image nodes share one required cookie variable and one peer list."""
    nodes = services("rabbitmq")
    assert len(nodes) == 3, sorted(nodes)
    cookies = set()
    conf_sources = set()
    data_volumes = set()
    for name, node in nodes.items():
        assert node["image"] == "rabbitmq:3.13-management", name
        cookie = environment(node).get("RABBITMQ_ERLANG_COOKIE", "")
        assert REQUIRED_REFERENCE.match(cookie), f"{name}: the cookie must be a required ${{...}}"
        cookies.add(cookie)
        confs = [
            (source, read_only)
            for source, target, read_only in mounts(node)
            if target == "/etc/rabbitmq/rabbitmq.conf"
            or re.fullmatch(r"/etc/rabbitmq/conf\.d/[\w.-]+\.conf", target)
        ]
        assert len(confs) == 1, f"{name}: one rabbitmq.conf mounted"
        assert confs[0][1], f"{name}: the conf is mounted read-only"
        conf_sources.add(bind_source(confs[0][0]))
        data = [source for source, target, _ in mounts(node) if target == "/var/lib/rabbitmq"]
        assert len(data) == 1, f"{name}: its own data volume"
        data_volumes.add(data[0])
        assert node.get("hostname"), f"{name}: a fixed hostname makes the node name"
        assert node.get("healthcheck", {}).get("test"), f"{name}: a healthcheck"
    assert len(cookies) == 1, "every node must read the same cookie variable"
    assert conf_sources == {CLUSTER_DIR / "rabbitmq.conf"}
    assert len(data_volumes) == 3
    assert data_volumes <= set(compose().get("volumes") or {})


def test_rabbitmq_conf_lists_every_node() -> None:
    """classic_config peer discovery names each node, and new queues default to quorum."""
    conf = rabbitmq_conf()
    assert conf["cluster_formation.peer_discovery_backend"] in {
        "classic_config",
        "rabbit_peer_discovery_classic_config",
    }
    listed = {v for k, v in conf.items() if k.startswith("cluster_formation.classic_config.nodes.")}
    hostnames = {node["hostname"] for node in services("rabbitmq").values()}
    assert listed == {f"rabbit@{host}" for host in hostnames}
    assert conf.get("default_queue_type") == "quorum"


# --- compose: the listener replicas and the load balancer -----------------------------


def test_compose_runs_three_listener_replicas_each_with_its_journal() -> None:
    """listener-1..3: built like docker/compose.yaml, one read-only config, own journals."""
    replicas = services("listener")
    assert sorted(replicas) == ["listener-1", "listener-2", "listener-3"]
    raw = cluster_config_raw()
    journal_dir = str(PurePosixPath(raw["journal"]["path"]).parent)
    assert journal_dir == dockerfile_volume(), "the journal lives in the image's VOLUME"
    journals = set()
    for name, replica in replicas.items():
        assert replica["build"]["context"] == "..", name
        command = replica["command"]
        assert command[:2] == ["run", "--config"] and len(command) == 3, name
        configs = [
            (source, read_only)
            for source, target, read_only in mounts(replica)
            if target == command[2]
        ]
        assert configs == [(configs[0][0], True)], f"{name}: the --config file mounted read-only"
        assert bind_source(configs[0][0]) == CLUSTER_DIR / "config.yaml"
        own = [source for source, target, _ in mounts(replica) if target == journal_dir]
        assert len(own) == 1 and not own[0].startswith((".", "/")), f"{name}: a named volume"
        journals.add(own[0])
        assert set(replica["depends_on"]) >= set(services("rabbitmq")), name
        grace = parse_duration(replica["stop_grace_period"])
        assert grace > parse_duration(raw["shutdown_timeout"]), name
        for address, _, target in published(replica):
            assert address == "127.0.0.1", f"{name}: port {target} only on the loopback"
            assert target != raw["http"]["port"], f"{name}: webhooks go through the balancer"
    assert len(journals) == 3, "each replica has its own journal volume"
    assert journals <= set(compose().get("volumes") or {})


def test_cluster_config_names_every_node_and_enables_the_cluster() -> None:
    """broker.urls lists the three nodes; cluster.enabled; quorum quarantine; admin on 0.0.0.0."""
    raw = cluster_config_raw()
    hosts = [urlsplit(url).hostname for url in raw["broker"]["urls"]]
    assert sorted(hosts) == sorted(node["hostname"] for node in services("rabbitmq").values())
    assert all(urlsplit(url).port == 5672 for url in raw["broker"]["urls"])
    assert "url" not in raw["broker"]
    assert raw["broker"]["queue_type"] == "quorum"
    assert raw["cluster"]["enabled"] is True
    assert parse_duration(raw["cluster"]["lease_retry"]) == 2
    assert raw["admin"]["host"] == "0.0.0.0", "the Dockerfile's healthcheck and the balancer"
    kinds = {s["name"]: (s["kind"], s["provider"]) for s in raw["sources"]}
    assert kinds == {
        "gst": ("webhook", "getstoken"),
        "lx": ("websocket", "layerx402"),
        "tt": ("poll", "tokenterminal"),
        "bonds": ("poll", "terrapin"),
    }


def test_compose_load_balancer_spreads_webhooks_over_the_replicas() -> None:
    """One balancer publishes 8080; its config names every replica's :8080 and nothing else."""
    balancers = services("loadbalancer")
    assert len(balancers) == 1
    ((name, balancer),) = balancers.items()
    webhook_port = cluster_config_raw()["http"]["port"]
    assert webhook_port == 8080
    ports = published(balancer)
    assert [(host, address) for address, host, _ in ports] == [(8080, "0.0.0.0")], name
    configs = [
        bind_source(source)
        for source, target, read_only in mounts(balancer)
        if read_only and target in {"/etc/nginx/nginx.conf", "/usr/local/etc/haproxy/haproxy.cfg"}
    ]
    assert len(configs) == 1 and configs[0].parent == CLUSTER_DIR
    text = configs[0].read_text(encoding="utf-8")
    lines = [line.split("#", 1)[0] for line in text.splitlines()]
    upstreams = {
        (m[1], int(m[2]))
        for line in lines
        if (m := re.search(r"^\s*server\s+(?:[\w.-]+\s+)?([\w.-]+):(\d+)\b", line))
    }
    assert upstreams == {(replica, webhook_port) for replica in services("listener")}
    listens = {
        int(m[1])
        for line in lines
        if (m := re.search(r"^\s*(?:listen|bind)\s+\S*?:?(\d+)\b", line))
    }
    assert listens == {ports[0][2]}, "the balancer listens on the port it publishes"
    assert set(balancer["depends_on"]) == set(services("listener"))


def test_compose_ships_no_secret() -> None:
    """Every secret-like value in the compose file and the cluster's files is a ${...} reference."""
    for name, service in compose()["services"].items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key):
                assert NO_VALUE_REFERENCE.match(value), f"{name}.environment.{key} holds a value"
    raw = cluster_config_raw()
    found = list(inline_secrets(raw))
    assert found, "the cluster config reads its secrets from the environment"
    for where, value in found:
        for item in value if isinstance(value, list) else [value]:
            assert re.fullmatch(r"\$\{[A-Z_][A-Z0-9_]*\}", item), f"{where} holds a value"
    for url in raw["broker"]["urls"]:
        password = urlsplit(url).password
        assert password and re.fullmatch(r"\$\{[A-Z_][A-Z0-9_]*\}", password), url
    credentials = [k for k in rabbitmq_conf() if re.search(r"pass|cookie|secret", k, re.I)]
    assert not credentials, f"rabbitmq.conf sets {credentials}: the environment does"


def test_single_node_compose_keeps_its_broker_and_ships_no_credential() -> None:
    """
    docker/compose.yaml: the broker's node name and data survive a recreated container
    (its archive stream and queues were lost), its credentials come from .env (it
    shipped guest:guest), and both services come back after a crash or a reboot.
    """
    data = load_yaml(ROOT / "docker" / "compose.yaml")
    rabbitmq, listener = data["services"]["rabbitmq"], data["services"]["listener"]
    assert rabbitmq["hostname"]
    assert any(v.split(":")[1] == "/var/lib/rabbitmq" for v in rabbitmq["volumes"])
    assert rabbitmq["volumes"][0].split(":")[0] in data["volumes"]
    password = rabbitmq["environment"]["RABBITMQ_DEFAULT_PASS"]
    assert NO_VALUE_REFERENCE.match(password), password
    url = environment(listener)["RABBITMQ_URL"]
    assert "guest" not in url and "${RABBITMQ_PASSWORD" in url, url
    assert rabbitmq["restart"] == listener["restart"] == "unless-stopped"


def test_the_image_points_its_sources_at_the_providers() -> None:
    """
    The image's config.yaml defaults to `make run`'s local simulators: a `docker run`
    with only the secrets set polled 127.0.0.1 and said it was healthy. The image sets
    the production endpoints compose uses.
    """
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    env = dict(
        re.findall(r"\b([A-Z0-9_]+)=(\S+)", " ".join(re.findall(r"^ENV\s+(.*)$", text, re.M)))
    )
    single = environment(load_yaml(ROOT / "docker" / "compose.yaml")["services"]["listener"])
    for name in ("LAYERX402_URL", "TOKENTERMINAL_URL", "TERRAPIN_URL"):
        default = COMPOSE_VARIABLE.match(single[name])
        assert default and default[2] == ":-", single[name]
        assert env.get(name) == default[3], name


def test_compose_gives_every_replica_the_variables_its_config_needs() -> None:
    """Each ${VAR} without a fallback in docker/cluster/config.yaml is set by compose."""
    needed = {
        m[1]
        for value in strings(cluster_config_raw())
        for m in CONFIG_VARIABLE.finditer(value)
        if m[2] is None
    }
    assert needed
    for name, replica in services("listener").items():
        missing = needed - set(environment(replica))
        assert not missing, f"{name} lacks {sorted(missing)}"


# --- Kubernetes -----------------------------------------------------------------------


def test_k8s_deployment_service_and_pdb_select_the_same_pods() -> None:
    """Three replicas; the selector, the Service and the PDB all match the pod labels."""
    objects = manifests()
    deployment = objects["Deployment"]
    assert deployment["spec"]["replicas"] == 3
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= labels.items()
    service_selector = objects["Service"]["spec"]["selector"]
    assert service_selector and service_selector.items() <= labels.items()
    pdb = objects["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    pdb_selector = pdb["spec"]["selector"]["matchLabels"]
    assert pdb_selector and pdb_selector.items() <= labels.items()
    replicas = deployment["spec"]["replicas"]
    if "maxUnavailable" in pdb["spec"]:
        allowed = pdb["spec"]["maxUnavailable"]
    else:
        allowed = replicas - pdb["spec"]["minAvailable"]
    assert isinstance(allowed, int) and 1 <= allowed <= replicas // 2


def test_k8s_container_runs_the_configmap_config() -> None:
    """`listener run --config PATH`, PATH being the ConfigMap's config.yaml, mounted read-only."""
    spec = container()
    argv = list(spec.get("command") or dockerfile_entrypoint()) + list(spec.get("args") or [])
    assert argv[:3] == ["listener", "run", "--config"] and len(argv) == 4
    path = PurePosixPath(argv[3])
    mount = volume_under(str(path), kind="configMap")
    assert mount is not None and mount.get("readOnly") is True
    configmap = manifests()["ConfigMap"]
    assert mount["volume"]["configMap"]["name"] == configmap["metadata"]["name"]
    relative = str(path.relative_to(mount["mountPath"]))
    items = mount["volume"]["configMap"].get("items")
    keys = (
        {item["path"]: item["key"] for item in items}
        if items
        else {k: k for k in configmap["data"]}
    )
    assert keys.get(relative) == "config.yaml"


def test_k8s_probes_hit_healthz_and_readyz_on_the_admin_port() -> None:
    """
    Liveness /healthz and readiness /readyz?for=intake (not the broker: webhooks wait in
    the journal while it is away) on the config's admin port, bound to 0.0.0.0.
    """
    raw = k8s_config_raw()
    admin_port = raw.get("admin", {}).get("port", 9090)
    assert raw["admin"]["host"] == "0.0.0.0", "the kubelet probes the pod address"
    spec = container()
    liveness = spec["livenessProbe"]["httpGet"]
    readiness = spec["readinessProbe"]["httpGet"]
    assert liveness["path"] == "/healthz"
    assert readiness["path"] == "/readyz?for=intake"
    assert container_port(liveness["port"]) == admin_port
    assert container_port(readiness["port"]) == admin_port


def test_k8s_service_exposes_the_webhook_port_only() -> None:
    """The Service targets the config's http port; the admin port is never on a public Service."""
    raw = k8s_config_raw()
    http_port = raw.get("http", {}).get("port", 8080)
    admin_port = raw.get("admin", {}).get("port", 9090)
    declared = {p["containerPort"] for p in container()["ports"]}
    assert {http_port, admin_port} <= declared
    targets = {
        container_port(p.get("targetPort", p["port"]))
        for p in manifests()["Service"]["spec"]["ports"]
    }
    assert targets == {http_port}


def test_k8s_every_secret_file_is_in_the_mounted_secret() -> None:
    """Each *_file of the ConfigMap's config lies in a Secret volume; no secret is inline."""
    raw = k8s_config_raw()
    files = list(file_keys(raw))
    assert {key for _, key, _ in files} >= {"key_file", "api_key_file", "secrets_file"}
    assert {"url_file", "urls_file"} & set(raw["broker"]), "the broker password from a file"
    assert not list(inline_secrets(raw)), "secrets come from files"
    assert "url" not in raw["broker"] and "urls" not in raw["broker"], "the broker password too"
    assert "Secret" not in manifests(), "the Secret is created by hand, never shipped"
    readme = (K8S / "README.md").read_text(encoding="utf-8")
    for where, _, path in files:
        mount = volume_under(path, kind="secret")
        assert mount is not None, f"{where}: {path} is not under a mounted Secret"
        assert mount.get("readOnly") is True
        secret = mount["volume"]["secret"]
        name = str(PurePosixPath(path).relative_to(mount["mountPath"]))
        if secret.get("items"):
            assert name in {item["path"] for item in secret["items"]}, where
        assert f"kubectl create secret generic {secret['secretName']}" in readme
        assert re.search(rf"--from-(?:file|literal)={re.escape(name)}=", readme), (
            f"README.md's command does not create {name}"
        )


def test_k8s_grace_period_outlasts_the_drain() -> None:
    """terminationGracePeriodSeconds > shutdown_timeout (+ the preStop pause, if any)."""
    shutdown = parse_duration(k8s_config_raw().get("shutdown_timeout", "20s"))
    pre_stop = container().get("lifecycle", {}).get("preStop", {})
    pause = 0.0
    if pre_stop.get("sleep"):
        pause = float(pre_stop["sleep"]["seconds"])
    elif (command := pre_stop.get("exec", {}).get("command")) and command[0] == "sleep":
        pause = parse_duration(command[1] if command[1][-1].isalpha() else f"{command[1]}s")
    assert pod_spec()["terminationGracePeriodSeconds"] > shutdown + pause


def test_k8s_pod_is_locked_down_with_a_writable_journal() -> None:
    """Non-root (the image's uid), read-only root fs, resources, the journal on its own volume."""
    pod = pod_spec()
    spec = container()
    security = {**pod.get("securityContext", {}), **spec.get("securityContext", {})}
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == dockerfile_uid()
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert "ALL" in security["capabilities"]["drop"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(spec["resources"][kind]), kind
    journal = k8s_config_raw()["journal"]["path"]
    mount = volume_under(journal, kind="emptyDir") or volume_under(
        journal, kind="persistentVolumeClaim"
    )
    assert mount is not None and not mount.get("readOnly"), "the journal needs a writable volume"
    assert str(PurePosixPath(journal).parent) == dockerfile_volume()
    assert volume_under("/tmp/x", kind="emptyDir") is not None, "SQLite's temp files"


def test_kustomization_lists_every_manifest() -> None:
    """kustomization.yaml's resources are exactly the manifests of the directory."""
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    present = {p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert set(listed) == present
    assert {"configmap.yaml", "deployment.yaml", "service.yaml", "pdb.yaml"} <= present


# --- the configurations load with the project's own loader ---------------------------

# Values for the variables and files the deployments provide, by name.
SAMPLES = {
    "GST_WEBHOOK_SECRET": WHSEC,
    "LISTENER_ADMIN_KEY": ADMIN_KEY,
    "RABBITMQ_USER": "listener",
    "RABBITMQ_PASSWORD": RABBITMQ_PASSWORD,
    "LAYERX402_API_KEY": "lx_test_key",
    "TOKENTERMINAL_API_KEY": "tt_test_key",
    "TERRAPIN_API_KEY": "tp_test_key",
}


def compose_environment(replica: Mapping[str, Any]) -> dict[str, str]:
    """The environment compose gives a replica, with .env holding SAMPLES."""
    resolved = {}
    for key, value in environment(replica).items():
        match = COMPOSE_VARIABLE.match(value)
        if match is None:
            resolved[key] = value
        elif match[1] in SAMPLES:
            resolved[key] = SAMPLES[match[1]]
        else:
            assert match[2] in {"-", ":-"}, f"{key}: .env would need {match[1]}"
            resolved[key] = match[3]
    return resolved


def test_cluster_config_loads_with_the_compose_environment() -> None:
    """docker/cluster/config.yaml validates with exactly what compose passes listener-1."""
    replica = services("listener")["listener-1"]
    config = load_config(CLUSTER_DIR / "config.yaml", environ=compose_environment(replica))
    urls = [secret_text(url) for url in config.broker.urls]
    assert [urlsplit(url).hostname for url in urls] == ["rabbitmq-1", "rabbitmq-2", "rabbitmq-3"]
    assert all(urlsplit(url).password == RABBITMQ_PASSWORD for url in urls)
    assert config.broker.queue_type == "quorum"
    assert config.cluster.enabled is True
    assert config.cluster.lease_retry == 2
    assert config.admin.host == "0.0.0.0"
    assert config.sources[0].signature.secrets[0].get_secret_value() == WHSEC
    assert config.sources[1].url == "wss://api.layerx402.dev/ws", "an empty URL variable falls back"
    assert config.shutdown_timeout < parse_duration(replica["stop_grace_period"])


def test_k8s_config_loads_with_the_mounted_secret_files(tmp_path: Path) -> None:
    """The ConfigMap's config.yaml validates, its *_file keys pointed at files like the Secret's."""
    raw = k8s_config_raw()
    urls = [f"amqp://listener:{RABBITMQ_PASSWORD}@rabbitmq-{i}.rabbitmq:5672/" for i in range(3)]
    contents = {
        "key_file": ADMIN_KEY,
        "secrets_file": WHSEC,
        "api_key_file": "test_api_key",
        "urls_file": "\n".join(urls),
        "url_file": urls[0],
    }
    moved: dict[str, str] = {}
    for where, key, path in file_keys(raw):
        assert key in contents, f"{where}: no sample for {key}"
        local = tmp_path / "secrets" / PurePosixPath(path).name
        local.parent.mkdir(exist_ok=True)
        local.write_text(contents[key] + "\n")
        moved[path] = str(local)

    def relocate(node: Any) -> Any:
        if isinstance(node, list):
            return [relocate(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if not str(key).endswith("_file"):
                out[key] = relocate(value)
            elif isinstance(value, list):
                out[key] = [moved[item] for item in value]
            else:
                out[key] = moved[value]
        return out

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(relocate(raw), sort_keys=False))
    env = {e["name"]: str(e.get("value", "")) for e in container().get("env", [])}
    config = load_config(path, environ=env)
    assert [secret_text(url) for url in config.broker.urls] == urls
    assert config.broker.queue_type == "quorum"
    assert config.cluster.enabled is True
    assert config.admin.api_keys[0].key.get_secret_value() == ADMIN_KEY
    assert config.sources[0].signature.secrets[0].get_secret_value() == WHSEC
    assert all(
        s.api_key.get_secret_value() == "test_api_key"
        for s in config.sources
        if s.kind != "webhook"
    )
