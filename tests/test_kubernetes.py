"""integrations/kubernetes and the Containerfile: what can be checked without a cluster.

Every overlay is rendered with `kubectl kustomize` (offline) and every object validated with
`kubernetes-validate --strict` against Kubernetes 1.32 (the kubectl client this was written
with; the Prometheus Operator's objects, which it has no schema for, are checked here by
hand). The node's and the router's configuration and arguments, as the rendered pods would
see them, are run through `sllm node --check-config` / `sllm router --check-config`, with
the pods' volume mounts mapped to temporary directories and the token init containers' own
commands run to make the token files. Then what a wrong manifest would break: selectors,
the NetworkPolicy, probe ports, the DRAM volume's size against the tier's capacity.
"""

from __future__ import annotations

import copy
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "integrations" / "kubernetes"
OVERLAYS = ["cpu", "gpu"]
K8S_VERSION = "1.32"
NODE_LABELS = {"app.kubernetes.io/name": "sllm-node"}
ROUTER_LABELS = {"app.kubernetes.io/name": "sllm-router"}


def _missing(what: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is missing in CI")
    pytest.skip(f"{what} is not installed here")


@pytest.fixture(scope="module")
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        _missing("kubectl (Debian package kubernetes-client)")
    return path


def validator():
    try:
        import kubernetes_validate
    except ImportError:
        _missing("kubernetes-validate (pip, in the test extra)")
    return kubernetes_validate


@pytest.fixture(scope="module")
def tree(tmp_path_factory, kubectl) -> Path:
    """A copy of integrations/kubernetes with freshly generated token files (as a user makes
    them, see its README); the checkout's own token files, if any, are not used."""
    dst = tmp_path_factory.mktemp("k8s") / "kubernetes"
    shutil.copytree(K8S, dst, ignore=shutil.ignore_patterns("node-token", "admin-token"))
    for name in ("node-token", "admin-token"):
        (dst / "base" / "tokens" / name).write_text(secrets.token_urlsafe(32) + "\n")
    return dst


def render(kubectl: str, directory: Path) -> list[dict]:
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(name)]
    assert len(found) == 1, f"{kind} {name}: {len(found)} objects"
    return found[0]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request, kubectl, tree) -> tuple[str, list[dict]]:
    return request.param, render(kubectl, tree / "overlays" / request.param)


def container(pod_spec: dict, name: str, init: bool = False) -> dict:
    key = "initContainers" if init else "containers"
    return next(c for c in pod_spec[key] if c["name"] == name)


def quantity(text: str | int) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6,
             "G": 10**9}
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", str(text))
    assert m and m.group(2) in {"", *units}, f"unexpected quantity {text!r}"
    return int(m.group(1)) * units.get(m.group(2), 1)


def matches(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels and In expressions, as these manifests use) on labels."""
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In"
        ok = ok and labels.get(expr["key"]) in expr["values"]
    return ok


# -- rendering and schemas --------------------------------------------------------------------


def test_every_overlay_renders_and_validates_strictly(overlay):
    kv = validator()
    name, objects = overlay
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ConfigMap", "DaemonSet", "Deployment", "NetworkPolicy", "NetworkPolicy",
                     "Secret", "Service", "Service"], kinds
    for obj in objects:
        kv.validate(obj, K8S_VERSION, strict=True)
        assert "namespace" not in obj["metadata"], "the base leaves the namespace to the user"
    # The validator is no rubber stamp: a misspelt field fails it.
    bad = copy.deepcopy(one(objects, "DaemonSet", "sllm-node"))
    bad["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


def test_monitoring_objects_are_well_formed_and_select_what_they_scrape(kubectl, tree):
    """The Prometheus Operator's kinds have no schema in kubernetes-validate (it only warns),
    so their shape is checked here: each selects the pods or Service it means, by a port
    name that exists there, at /metrics."""
    kv = validator()
    objects = render(kubectl, tree / "monitoring")
    base = render(kubectl, tree / "overlays" / "cpu")
    node_pod = one(base, "DaemonSet", "sllm-node")["spec"]["template"]
    router_svc = one(base, "Service", "sllm-router")
    pm, sm = one(objects, "PodMonitor", "sllm-node"), one(objects, "ServiceMonitor", "sllm-router")
    for obj in (pm, sm):
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(pm["spec"]) == {"selector", "podMetricsEndpoints"}
    assert matches(pm["spec"]["selector"], node_pod["metadata"]["labels"])
    node_ports = {p["name"] for p in container(node_pod["spec"], "node")["ports"]}
    for ep in pm["spec"]["podMetricsEndpoints"]:
        assert ep["port"] in node_ports and ep["path"] == "/metrics"
    assert set(sm["spec"]) == {"selector", "endpoints"}
    assert matches(sm["spec"]["selector"], router_svc["metadata"]["labels"])
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in {p["name"] for p in router_svc["spec"]["ports"]}
        assert ep["path"] == "/metrics"
    policy = one(objects, "NetworkPolicy", "sllm-prometheus")
    kv.validate(policy, K8S_VERSION, strict=True)
    assert matches(policy["spec"]["podSelector"], node_pod["metadata"]["labels"])


def test_without_generated_tokens_nothing_renders(kubectl, tmp_path):
    """No placeholder token can be deployed: the Secret is generated from files the user
    makes, and rendering fails, naming the missing file, until they exist."""
    dst = tmp_path / "kubernetes"
    shutil.copytree(K8S, dst, ignore=shutil.ignore_patterns("node-token", "admin-token"))
    out = subprocess.run([kubectl, "kustomize", str(dst / "overlays" / "cpu")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "tokens/node-token" in out.stderr


# -- the configuration and arguments, as `sllm` would take them ---------------------------------


def _mounts(pod_spec: dict, c: dict, tmp: Path) -> dict[str, Path]:
    """Each of the container's mount paths -> a directory under tmp (shared per volume, so
    an init container's output is the main container's input, as in the pod)."""
    mapping = {}
    for m in c.get("volumeMounts", []):
        d = tmp / "volumes" / m["name"]
        d.mkdir(parents=True, exist_ok=True)
        mapping[m["mountPath"]] = d
    return mapping


def _remap(text: str, mapping: dict[str, Path]) -> str:
    """Every mount path in `text` (the longest first, in one pass) -> its directory."""
    pattern = "|".join(re.escape(m) for m in sorted(mapping, key=len, reverse=True))
    return re.sub(rf"(?<![\w/])({pattern})(?![\w.-])", lambda m: str(mapping[m.group(1)]),
                  text)


def _fill_secret(objects: list[dict], pod_spec: dict, tmp: Path) -> None:
    """The Secret volume as kubelet fills it: its keys as files, defaultMode (0440)."""
    secret = one(objects, "Secret", "sllm-tokens")
    vol = next(v for v in pod_spec["volumes"] if "secret" in v)
    assert vol["secret"]["secretName"] == secret["metadata"]["name"]
    d = tmp / "volumes" / vol["name"]
    d.mkdir(parents=True, exist_ok=True)
    import base64

    keys = [i["key"] for i in vol["secret"].get("items", [])] or list(secret["data"])
    for key in keys:
        f = d / key
        f.write_bytes(base64.b64decode(secret["data"][key]))
        f.chmod(vol["secret"]["defaultMode"])


def _run_init(c: dict, mapping: dict[str, Path]) -> None:
    command = [_remap(part, mapping) for part in c["command"]]
    out = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"init container {c['name']}: {out.stderr}"


def _sllm(args: list[str], mapping: dict[str, Path], env: dict[str, str]) -> subprocess.CompletedProcess:
    resolved = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], _remap(a, mapping))
                for a in args]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLLM_")}
    return subprocess.run([sys.executable, "-m", "sllm_plugin.cli", *resolved, "--check-config"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**clean, "PYTHONPATH": str(ROOT)})


def test_the_node_takes_its_configuration_and_arguments(overlay, tmp_path):
    name, objects = overlay
    pod = one(objects, "DaemonSet", "sllm-node")["spec"]["template"]["spec"]
    node = container(pod, "node")
    mapping = _mounts(pod, node, tmp_path)
    config_vol = next(v for v in pod["volumes"] if "configMap" in v)
    cm = one(objects, "ConfigMap", config_vol["configMap"]["name"])
    node_yaml = cm["data"]["node.yaml"]
    config = yaml.safe_load(node_yaml)
    # Every path the node is configured with lies on one of its volumes (not in the image).
    for path in (config["token_file"], config["state_dir"], config["dram"]["path"],
                 config["ssd"]["path"]):
        assert any(path == m or path.startswith(m + "/") for m in mapping), path
    (mapping["/etc/sllm"] / "node.yaml").write_text(_remap(node_yaml, mapping))
    _fill_secret(objects, pod, tmp_path)
    for init in pod["initContainers"]:
        m = _mounts(pod, init, tmp_path)
        if init["name"] == "token":  # own-dirs chowns to uid 10001: checked in the next test
            _run_init(init, m)
    # The Secret's file (root's, 0440 in a pod) is not a token file the node accepts; the copy
    # the init container made is.
    token_init = container(pod, "token", init=True)
    secret_mount = next(m["mountPath"] for m in token_init["volumeMounts"] if m["readOnly"])
    direct = _sllm(node["args"] + ["--token-file", f"{secret_mount}/node-token"],
                   {**mapping, **_mounts(pod, token_init, tmp_path)}, {"POD_IP": "10.1.2.3"})
    assert direct.returncode == 2 and "readable or writable by others" in direct.stderr
    out = _sllm(node["args"], mapping, {"POD_IP": "10.1.2.3"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("configuration OK: node on 0.0.0.0:8073 (replicas reported as 10.1.2.3)")
    if name == "gpu":
        assert "devices cuda:0" in out.stdout
    # Nothing was created: no tier or state directory, no lock, no port.
    assert not (mapping["/var/lib/sllm"] / "ssd").exists()
    assert not (mapping["/var/lib/sllm"] / "state").exists()
    assert list(mapping["/dev/shm/sllm"].iterdir()) == []


def test_the_node_pod_hands_its_directories_to_the_node_user(overlay):
    """kubelet makes hostPath and emptyDir volumes as root; the node adopts only directories
    of its own user. The root init container chowns exactly the node's data volumes to the
    node's uid, with no more than CHOWN and FOWNER, and nothing runs privileged."""
    _, objects = overlay
    pod = one(objects, "DaemonSet", "sllm-node")["spec"]["template"]["spec"]
    node = container(pod, "node")
    uid = node["securityContext"]["runAsUser"]
    own = container(pod, "own-dirs", init=True)
    script = own["command"][-1]
    data_mounts = [m["mountPath"] for m in own["volumeMounts"]]
    assert {m["mountPath"] for m in node["volumeMounts"]} >= set(data_mounts)
    for path in data_mounts:
        assert re.search(rf"chown {uid}:{uid} [^&]*{re.escape(path)}\b", script)
        assert re.search(rf"chmod 0700 [^&]*{re.escape(path)}\b", script)
    assert own["securityContext"]["capabilities"] == {"drop": ["ALL"],
                                                      "add": ["CHOWN", "FOWNER"]}
    assert pod.get("hostNetwork", False) is False
    for c in pod["containers"] + pod["initContainers"]:
        sc = c["securityContext"]
        assert not sc.get("privileged", False) and sc["allowPrivilegeEscalation"] is False
        if c is not own:
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == uid
    assert pod["securityContext"]["fsGroup"] == uid


def test_the_router_takes_its_configuration_and_arguments(overlay, tmp_path):
    _, objects = overlay
    pod = one(objects, "Deployment", "sllm-router")["spec"]["template"]["spec"]
    router = container(pod, "router")
    mapping = _mounts(pod, router, tmp_path)
    cm = one(objects, "ConfigMap", next(v for v in pod["volumes"]
                                        if "configMap" in v)["configMap"]["name"])
    (mapping["/etc/sllm"] / "router.yaml").write_text(_remap(cm["data"]["router.yaml"], mapping))
    _fill_secret(objects, pod, tmp_path)
    _run_init(container(pod, "tokens", init=True),
              _mounts(pod, container(pod, "tokens", init=True), tmp_path))
    out = _sllm(router["args"], mapping, {})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("configuration OK: router on 0.0.0.0:8080; 0 node(s) and those "
                                  "dns://sllm-node:8073 names; 0 model(s); admin API on")


# -- what a wrong manifest would break ----------------------------------------------------------


def test_discovery_network_policy_and_probes_fit_together(overlay):
    name, objects = overlay
    ds = one(objects, "DaemonSet", "sllm-node")
    node_pod = ds["spec"]["template"]
    router_pod = one(objects, "Deployment", "sllm-router")["spec"]["template"]
    node_config = yaml.safe_load(one(objects, "ConfigMap", "sllm-config")["data"]["node.yaml"])
    router_config = yaml.safe_load(one(objects, "ConfigMap", "sllm-config")["data"]["router.yaml"])
    node_labels, router_labels = node_pod["metadata"]["labels"], router_pod["metadata"]["labels"]
    assert matches(ds["spec"]["selector"], node_labels)

    # The headless Service lists the ready node pods on the node's port; the router asks it.
    svc = one(objects, "Service", "sllm-node")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"].get("publishNotReadyAddresses", False) is False
    assert svc["spec"]["selector"].items() <= node_labels.items()
    assert not svc["spec"]["selector"].items() <= router_labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["port"] == node_config["port"]
    args = container(router_pod["spec"], "router")["args"]
    assert args[args.index("--discover") + 1] == f"dns://{svc['metadata']['name']}:{port['port']}"

    rsvc = one(objects, "Service", "sllm-router")
    assert rsvc["spec"]["type"] == "ClusterIP"
    assert rsvc["spec"]["selector"].items() <= router_labels.items()
    assert rsvc["spec"]["ports"][0]["port"] == router_config["port"] == 8080

    # The node API and the replica range: from the router's pods only.
    policy = one(objects, "NetworkPolicy", "sllm-node")
    assert matches(policy["spec"]["podSelector"], node_labels)
    assert not matches(policy["spec"]["podSelector"], router_labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    assert set(source) == {"podSelector"}  # no namespaceSelector, no ipBlock
    assert matches(source["podSelector"], router_labels)
    assert not matches(source["podSelector"], node_labels)
    lo, hi = node_config["replica_port_range"]
    assert sorted((p["port"], p.get("endPort", p["port"])) for p in rule["ports"]) == \
        sorted([(node_config["port"], node_config["port"]), (lo, hi)])
    rpolicy = one(objects, "NetworkPolicy", "sllm-router")
    assert matches(rpolicy["spec"]["podSelector"], router_labels)
    assert [p["port"] for r in rpolicy["spec"]["ingress"] for p in r["ports"]] == [8080]

    # Every probe asks /health on a port its container exposes.
    for pod in (node_pod, router_pod):
        for c in pod["spec"]["containers"]:
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            probes = [c[k] for k in ("startupProbe", "livenessProbe", "readinessProbe") if k in c]
            assert {"livenessProbe", "readinessProbe"} <= set(c)
            for probe in probes:
                target = probe["httpGet"]["port"]
                assert target in ports or target in ports.values(), (c["name"], target)
                assert probe["httpGet"]["path"] == "/health"
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert ports["http"] == 8080
    assert dict(p for p in [(p["name"], p["containerPort"]) for p in
                            container(node_pod["spec"], "node")["ports"]]) == {"api": 8073}


def test_the_dram_tier_is_memory_backed_and_fits_its_volume(overlay):
    name, objects = overlay
    pod = one(objects, "DaemonSet", "sllm-node")["spec"]["template"]["spec"]
    node = container(pod, "node")
    config = yaml.safe_load(one(objects, "ConfigMap", "sllm-config")["data"]["node.yaml"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount_of = {m["mountPath"]: m["name"] for m in node["volumeMounts"]}
    dram = volumes[mount_of[config["dram"]["path"]]]
    assert dram["emptyDir"]["medium"] == "Memory"
    limit = quantity(dram["emptyDir"]["sizeLimit"])
    assert quantity(config["dram"]["capacity"].replace("iB", "i")) <= limit
    # tmpfs pages count toward the container's memory: the limit must hold the tier.
    assert quantity(node["resources"]["limits"]["memory"]) > limit
    ssd = volumes[next(n for p, n in mount_of.items()
                       if config["ssd"]["path"].startswith(p + "/"))]
    assert ssd["hostPath"]["type"] == "DirectoryOrCreate"
    gpus = node["resources"]["limits"].get("nvidia.com/gpu")
    if name == "gpu":
        cuda = [a for a in node["args"] if a.startswith("cuda:")]
        assert cuda and int(gpus) >= len(cuda)
        assert pod["nodeSelector"]
    else:
        assert gpus is None and not any(a.startswith("cuda:") for a in node["args"])


# -- the Containerfile --------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines()
                                             if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip()
             else "") for line in joined.splitlines() if line.strip()]


def test_the_containerfile_copies_what_exists_and_runs_sllm_as_the_manifests_user(overlay):
    _, objects = overlay
    steps = _instructions((ROOT / "Containerfile").read_text())
    assert steps[0][0] in {"ARG", "FROM"}
    assert any(k == "FROM" and "python:3.11-slim" in v or k == "ARG" and "python:3.11-slim" in v
               for k, v in steps)
    for kind, value in steps:
        if kind == "COPY" and not value.startswith("--from"):
            *sources, _dest = value.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    entry = [v for k, v in steps if k == "ENTRYPOINT"]
    assert entry == ['["sllm"]']
    (user,) = [v for k, v in steps if k == "USER"]
    uid = int(user.split(":")[0])
    assert uid != 0
    pods = [one(objects, "DaemonSet", "sllm-node"), one(objects, "Deployment", "sllm-router")]
    for w in pods:
        spec = w["spec"]["template"]["spec"]
        for c in spec["containers"]:
            sc = {**spec.get("securityContext", {}), **c.get("securityContext", {})}
            assert sc["runAsUser"] == uid
            assert c["image"].startswith("sllm-plugin:")
    run = " ".join(v for k, v in steps if k == "RUN")
    assert "node,router,vllm-cpu" in run and "node,router,vllm]" in run
    assert "import sllm_plugin._fastio" in run  # the Cython extension was built


# -- --check-config on its own ------------------------------------------------------------------


def _check(*args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLLM_")}
    return subprocess.run([sys.executable, "-m", "sllm_plugin.cli", *args, "--check-config"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**clean, "PYTHONPATH": str(ROOT)})


def test_node_check_config_refuses_what_a_start_refuses_and_creates_nothing(tmp_path):
    token = tmp_path / "token"
    token.write_text(secrets.token_urlsafe(32))
    token.chmod(0o600)
    base = ["node", "--state-dir", str(tmp_path / "state"), "--token-file", str(token),
            "--dram-dir", str(tmp_path / "dram"), "--dram-capacity", "1GiB",
            "--ssd-dir", str(tmp_path / "ssd"), "--ssd-capacity", "1GiB"]
    ok = _check(*base)
    assert ok.returncode == 0 and ok.stdout.startswith("configuration OK: node on "), ok.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token"]  # nothing created
    (tmp_path / "ssd").mkdir(mode=0o700)
    (tmp_path / "ssd").chmod(0o770)
    bad = _check(*base)
    assert bad.returncode == 2 and f"the ssd tier {tmp_path / 'ssd'} is writable by group" \
        in bad.stderr
    (tmp_path / "ssd").chmod(0o700)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "state").symlink_to(tmp_path / "elsewhere")
    bad = _check(*base)
    assert bad.returncode == 2 and "state directory" in bad.stderr and "symbolic link" in bad.stderr
    (tmp_path / "state").unlink()
    token.chmod(0o644)
    bad = _check(*base)
    assert bad.returncode == 2 and f"{token}: the token file is readable or writable by others" \
        in bad.stderr
    token.chmod(0o600)
    config = tmp_path / "node.yaml"
    config.write_text("replica_port_range: [80, 90]\n")
    bad = _check(*base, "--config", str(config))
    assert bad.returncode == 2 and "replica_port_range" in bad.stderr
    assert _check(*base).returncode == 0


def test_router_check_config_reads_every_token_file_and_the_discovery_target(tmp_path):
    node_token, admin = tmp_path / "node-token", tmp_path / "admin-token"
    for f in (node_token, admin):
        f.write_text(secrets.token_urlsafe(32))
        f.chmod(0o600)
    base = ["router", "--discover", "dns://sllm-node:8073", "--node-token-file",
            str(node_token), "--admin-token-file", str(admin)]
    assert _check(*base).returncode == 0
    admin.chmod(0o640)
    bad = _check(*base)
    assert bad.returncode == 2 and "readable or writable by others" in bad.stderr
    admin.chmod(0o600)
    node_token.write_text("short")
    bad = _check(*base)
    assert bad.returncode == 2 and "16 to 4096 characters" in bad.stderr
    bad = _check("router", "--discover", "dns://sllm-node")
    assert bad.returncode == 2 and "is not dns://NAME:PORT" in bad.stderr
