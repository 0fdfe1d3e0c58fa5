"""Static checks of k8s/: kustomize renders, strict schema validation for Kubernetes
1.31-1.35, the contract (names, URLs, buckets, launcher config), security settings of
every workload, pinned images, and no committed secret values."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from k8s_helpers import (
    K8S_DIR,
    K8S_VERSIONS,
    REPO_ROOT,
    all_containers,
    find_tool,
    has_remote_base,
    is_component,
    kustomization_dirs,
    load_yaml_docs,
    pod_spec,
    read_kustomization,
    rel,
    render,
    renderable_kustomizations,
    run,
)

RENDERABLE = renderable_kustomizations()
KFP_REF = "2.17.0"

# Workloads allowed to run as root, by (kind, name), with the reason in the manifest itself.
ROOT_ALLOWED = {("DaemonSet", "nvidia-device-plugin")}


def _ids(dirs: list[Path]) -> list[str]:
    return [rel(d) for d in dirs]


def _objects_by(objs: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected exactly one {kind}/{name}, found {len(matches)}"
    return matches[0]


def _all_rendered() -> list[tuple[str, dict]]:
    return [(rel(d), obj) for d in RENDERABLE for obj in render(d)]


def _container(obj: dict, name: str) -> dict:
    spec = pod_spec(obj)
    assert spec is not None
    return next(c for c in all_containers(spec) if c["name"] == name)


# ------------------------------------------------------------------ discovery


def test_tree_has_the_expected_kustomizations():
    found = {rel(d) for d in kustomization_dirs()}
    expected = {
        "k8s/dlu",
        "k8s/kfp/cluster-scoped",
        "k8s/kfp/platform",
        "k8s/kfp/launcher",
        "k8s/nvidia",
        "k8s/serving",
    }
    assert expected <= found, f"missing kustomizations: {sorted(expected - found)}"
    # Only the two KFP install layers may depend on the network at render time.
    remote = {rel(d) for d in kustomization_dirs() if has_remote_base(d)}
    assert remote == {"k8s/kfp/cluster-scoped", "k8s/kfp/platform"}
    assert {"k8s/dlu", "k8s/nvidia", "k8s/serving"} <= set(_ids(RENDERABLE))


# ------------------------------------------------------------------ render + validate


def test_inference_service_serves_the_champion_from_the_in_cluster_mlflow():
    objs = render(K8S_DIR / "serving")
    isvc = _objects_by(objs, "InferenceService", "dl-uncertainty")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["metadata"]["namespace"] == "dlu"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"
    assert container["command"] == ["python", "-m", "dl_uncertainty.serve"]
    args = container["args"]
    assert args[args.index("--model") + 1] == "models:/dl-uncertainty-digits-1x8x8@champion"
    port = int(args[args.index("--port") + 1])
    assert container["ports"] == [{"containerPort": port, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v1/models/dl-uncertainty", "port": port}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.dlu.svc.cluster.local:5000"
    # dlu denies ingress by default: the predictor takes requests, and may reach MLflow
    policies = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "NetworkPolicy"}
    predictor = {"serving.kserve.io/inferenceservice": "dl-uncertainty"}
    assert policies["dl-uncertainty-predictor"]["podSelector"]["matchLabels"] == predictor
    assert policies["dl-uncertainty-predictor"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": port}]
    assert policies["mlflow-from-predictor"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": predictor}}]


def test_pod_part_of_a_predictor_is_validated_strictly():
    bad = {"kind": "InferenceService", "spec": {"predictor": {"minReplicas": 1, "containerz": []}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                                      "spec": pod_spec(bad)}, K8S_VERSIONS[-1], strict=True)



# KServe's own schema of the InferenceService (tests/k8s/schemas/README.md says where it comes from)
KSERVE_SCHEMA = Path(__file__).parent / "schemas" / "kserve-v0.15.2-inferenceservice-v1beta1.json"


def _strict(schema: dict) -> dict:
    """The CRD's schema with unknown fields refused, as the API server's strict field validation
    does (a CRD schema leaves them open; the server would silently prune them)."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {name: _strict(sub) for name, sub in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            schema[key] = _strict(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [_strict(sub) for sub in schema[key]]
    return schema


def _kserve_errors(isvc: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(_strict(json.loads(KSERVE_SCHEMA.read_text())))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(isvc)]


def test_inference_service_validates_against_kserves_crd_schema():
    isvc = _objects_by(render(K8S_DIR / "serving"), "InferenceService", "dl-uncertainty")
    assert _kserve_errors(isvc) == []


@pytest.mark.parametrize(("path", "value", "said"), [
    (("spec", "predictor", "minReplica"), 1, "'minReplica' was unexpected"),  # a typo of minReplicas
    (("spec", "predictor", "maxReplicas"), "two", "'two' is not of type 'integer'"),
    (("spec", "predictor", "containers", 0, "readinessProbe", "httpGet", "pathh"), "/", "'pathh' was unexpected"),
])
def test_kserve_schema_validation_can_fail(path, value, said):
    isvc = copy.deepcopy(_objects_by(render(K8S_DIR / "serving"), "InferenceService", "dl-uncertainty"))
    parent = isvc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    assert any(said in error for error in _kserve_errors(isvc)), _kserve_errors(isvc)


@pytest.mark.parametrize("directory", RENDERABLE, ids=_ids(RENDERABLE))
def test_kustomization_renders_and_validates_strict(directory: Path):
    objs = render(directory)
    assert objs, f"{rel(directory)} rendered no objects"
    errors = []
    for obj in objs:
        if obj["kind"] == "InferenceService":  # a CRD: its pod part is checked as a Pod, strictly
            obj = {"apiVersion": "v1", "kind": "Pod", "metadata": obj["metadata"], "spec": pod_spec(obj)}
        for version in K8S_VERSIONS:
            label = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')} @ {version}"
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                errors.append(f"{label}: {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                errors.append(f"{label}: {exc.message}")
            except kubernetes_validate.VersionNotSupportedError:
                pytest.fail(
                    f"installed kubernetes-validate does not support Kubernetes {version}",
                    pytrace=False,
                )
    assert not errors, "schema validation failed:\n" + "\n".join(errors)


def test_validation_can_fail():
    """Guard against a validator that accepts anything (e.g. unknown field in strict mode)."""
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"portz": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_launcher_component_patches_upstream_configmap(tmp_path: Path, kubectl: str):
    """k8s/kfp/launcher applied to a stand-in of KFP's own kfp-launcher ConfigMap."""
    (tmp_path / "upstream.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "kfp-launcher", "namespace": "kubeflow"},
                "data": {"defaultPipelineRoot": "minio://mlpipeline/v2/artifacts"},
            }
        )
    )
    component = Path(os.path.relpath(K8S_DIR / "kfp" / "launcher", tmp_path))
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["upstream.yaml"],
                "components": [str(component)],
            }
        )
    )
    result = run([kubectl, "kustomize", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    (cm,) = load_yaml_docs(result.stdout)
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(cm, version, strict=True)
    assert cm["metadata"] == {"name": "kfp-launcher", "namespace": "kubeflow"}
    assert cm["data"]["defaultPipelineRoot"] == "s3://mlpipeline/v2/artifacts"
    s3 = yaml.safe_load(cm["data"]["providers"])["s3"]["default"]
    assert s3["endpoint"] == "http://minio.dlu.svc.cluster.local:9000"
    assert s3["disableSSL"] is True and s3["forcePathStyle"] is True
    assert s3["region"]
    assert s3["credentials"] == {
        "fromEnv": False,
        "secretRef": {
            "secretName": "dlu-s3-credentials",
            "accessKeyKey": "AWS_ACCESS_KEY_ID",
            "secretKeyKey": "AWS_SECRET_ACCESS_KEY",
        },
    }


def test_kfp_layers_pin_the_sdk_release():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    pin = re.search(r'"kfp==([0-9.]+)"', pyproject)
    assert pin, "pyproject.toml must pin kfp==X.Y.Z"
    assert pin.group(1) == KFP_REF, "KFP manifests and kfp SDK must be the same release"
    cluster = read_kustomization(K8S_DIR / "kfp" / "cluster-scoped")["resources"]
    platform = read_kustomization(K8S_DIR / "kfp" / "platform")
    assert cluster == [
        f"https://github.com/kubeflow/pipelines//manifests/kustomize/cluster-scoped-resources?ref={KFP_REF}"
    ]
    assert platform["resources"] == [
        f"https://github.com/kubeflow/pipelines//manifests/kustomize/env/platform-agnostic?ref={KFP_REF}"
    ]
    assert platform["components"] == ["../launcher"]
    assert is_component(K8S_DIR / "kfp" / "launcher")


# ------------------------------------------------------------------ contract


def test_dlu_stack_contract():
    objs = render(K8S_DIR / "dlu")
    for obj in objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "dlu", (
                f"{obj['kind']}/{obj['metadata']['name']}"
            )
    ns = _objects_by(objs, "Namespace", "dlu")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"

    minio_svc = _objects_by(objs, "Service", "minio")
    assert {p["name"]: p["port"] for p in minio_svc["spec"]["ports"]} == {
        "api": 9000,
        "console": 9001,
    }
    assert [p["port"] for p in _objects_by(objs, "Service", "mlflow")["spec"]["ports"]] == [5000]
    assert [
        p["port"] for p in _objects_by(objs, "Service", "mlflow-postgres")["spec"]["ports"]
    ] == [5432]
    pg = _objects_by(objs, "StatefulSet", "mlflow-postgres")
    assert pg["spec"]["volumeClaimTemplates"], "PostgreSQL needs a PVC"
    _objects_by(objs, "PersistentVolumeClaim", "minio-data")

    minio = _container(_objects_by(objs, "Deployment", "minio"), "minio")
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in minio["env"] if "valueFrom" in e}
    assert refs["MINIO_ROOT_USER"] == {"name": "dlu-s3-credentials", "key": "AWS_ACCESS_KEY_ID"}
    assert refs["MINIO_ROOT_PASSWORD"] == {
        "name": "dlu-s3-credentials",
        "key": "AWS_SECRET_ACCESS_KEY",
    }

    job = _container(_objects_by(objs, "Job", "minio-buckets"), "mc")
    script = " ".join(job["command"])
    assert "mb --ignore-existing" in script
    assert re.search(r"for bucket in mlpipeline mlflow datasets", script)
    # `make stack-up` makes the same buckets in its S3 stand-in
    stack = (K8S_DIR / "scripts" / "local-stack.sh").read_text()
    assert re.search(r'^buckets="mlpipeline mlflow datasets"', stack, re.M)


def _launch_argv(script: str, env: dict[str, str], tmp_path: Path) -> list[str]:
    """What the MLflow launcher script executes, given the container's environment."""
    fake = tmp_path / "fake-mlflow"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake.chmod(0o755)
    launcher = tmp_path / "mlflow-server.sh"
    launcher.write_text(script)
    out = run(["/bin/sh", str(launcher)], env={"PATH": os.environ["PATH"], **env, "MLFLOW": str(fake)})
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def _k8s_env(container: dict) -> dict[str, str]:
    """The container's env as the kubelet builds it: secrets as placeholders, $(VAR) expanded."""
    env: dict[str, str] = {}
    for item in container["env"]:
        value = item.get("value", f"<{item['name']}>")
        env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), value)
    return env


def test_mlflow_server_contract(tmp_path):
    objs = render(K8S_DIR / "dlu")
    deployment = _objects_by(objs, "Deployment", "mlflow")
    mlflow = _container(deployment, "mlflow")
    assert mlflow["command"] == ["/bin/sh", "/opt/dlu/mlflow-server.sh"]
    volume = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == "launcher")
    config_map = _objects_by(objs, "ConfigMap", volume["configMap"]["name"])
    script = config_map["data"]["mlflow-server.sh"]
    # One launcher for the cluster and for `make stack-up`: the file both use.
    assert script == (K8S_DIR / "dlu" / "mlflow-server.sh").read_text()
    assert "k8s/dlu/mlflow-server.sh" in (K8S_DIR / "scripts" / "local-stack.sh").read_text()

    env = _k8s_env(mlflow)
    argv = _launch_argv(script, env, tmp_path)
    assert argv[0] == "server"
    flags: dict[str, str] = {}
    for arg in argv[1:]:
        if arg.startswith("--"):
            flags[last := arg] = ""
        else:
            flags[last] = arg
    assert flags["--host"] == "0.0.0.0" and flags["--port"] == "5000" and flags["--workers"] == "1"
    assert flags["--backend-store-uri"] == (
        "postgresql://mlflow:<MLFLOW_DB_PASSWORD>@mlflow-postgres.dlu.svc.cluster.local:5432/mlflow")
    assert "--serve-artifacts" in flags
    assert flags["--artifacts-destination"] == "s3://mlflow"
    allowed = flags["--allowed-hosts"].split(",")
    for host in ("mlflow.dlu.svc.cluster.local:5000", "localhost:5000", "127.0.0.1:5000"):
        assert host in allowed, f"--allowed-hosts lacks {host}"
    assert "export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in script
    raw = {e["name"]: e for e in mlflow["env"]}
    assert raw["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://minio.dlu.svc.cluster.local:9000"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert raw[key]["valueFrom"]["secretKeyRef"] == {"name": "dlu-s3-credentials", "key": key}
    assert raw["MLFLOW_DB_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-postgres"
    for probe in ("readinessProbe", "livenessProbe"):
        assert mlflow[probe]["httpGet"]["path"] == "/health"


def test_mlflow_launcher_refuses_a_missing_setting(tmp_path):
    script = (K8S_DIR / "dlu" / "mlflow-server.sh").read_text()
    launcher = tmp_path / "mlflow-server.sh"
    launcher.write_text(script)
    out = run(["/bin/sh", str(launcher)], env={"PATH": os.environ["PATH"], "MLFLOW_ALLOWED_HOSTS": "x",
                                               "MLFLOW_S3_ENDPOINT_URL": "http://s3"})
    assert out.returncode != 0 and "MLFLOW_BACKEND_STORE_URI" in out.stderr


def test_network_policies():
    objs = render(K8S_DIR / "dlu")
    policies = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "NetworkPolicy"}
    deny = policies["default-deny-ingress"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"]
    assert "ingress" not in deny

    def sources(name: str) -> list[dict]:
        spec = policies[name]
        return [peer for rule in spec["ingress"] for peer in rule["from"]]

    kubeflow = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubeflow"}}}
    assert kubeflow in sources("minio-api")
    assert kubeflow in sources("mlflow")
    assert sources("mlflow-postgres") == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}},
        {  # tuning-pipeline steps reach Optuna's database; KFP's own services do not
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubeflow"}},
            "podSelector": {"matchLabels": {"pipelines.kubeflow.org/v2_component": "true"}},
        },
    ]
    # Every pod we run in dlu is selected by some allow policy or is a pure client.
    assert policies["mlflow-postgres"]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "mlflow-postgres"
    }


def test_postgres_creates_optunas_database_for_the_tuning_pipeline():
    from sqlalchemy.engine import make_url

    from dl_uncertainty.config.compose import load_config

    objs = render(K8S_DIR / "dlu")
    pg = _objects_by(objs, "StatefulSet", "mlflow-postgres")
    container = _container(pg, "postgres")
    env = {e["name"]: e for e in container["env"]}
    assert env["OPTUNA_DB_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "optuna-postgres", "key": "OPTUNA_DB_PASSWORD"}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/docker-entrypoint-initdb.d")
    volume = next(v for v in pod_spec(pg)["volumes"] if v["name"] == mount["name"])
    script = _objects_by(objs, "ConfigMap", volume["configMap"]["name"])["data"]["10-optuna.sh"]
    # one init script for the cluster and for `make stack-up` (tests/integration runs it for real)
    assert script == (K8S_DIR / "dlu" / "10-optuna.sh").read_text()
    assert "k8s/dlu/10-optuna.sh" in (K8S_DIR / "scripts" / "local-stack.sh").read_text()
    assert "-v ON_ERROR_STOP=1" in script and ":'pw'" in script  # the password as a quoted psql literal
    for statement in ("CREATE ROLE optuna LOGIN", "CREATE DATABASE optuna OWNER optuna"):
        assert re.search(rf"'{statement}' WHERE NOT EXISTS .*\\gexec", script), statement  # idempotent
    # the pipeline's study storage is that database, as that user, without a password
    url = make_url(load_config().pipeline.tune_storage)
    assert (url.host, url.port, url.database, url.username, url.password) == (
        "mlflow-postgres.dlu.svc.cluster.local", 5432, "optuna", "optuna", None)
    assert [p["port"] for p in _objects_by(objs, "Service", "mlflow-postgres")["spec"]["ports"]] == [5432]


# ------------------------------------------------------------------ security


def _workloads() -> list[tuple[str, dict, dict]]:
    out = []
    for where, obj in _all_rendered():
        spec = pod_spec(obj)
        if spec is not None:
            out.append((where, obj, spec))
    return out


def test_there_are_workloads_to_check():
    kinds = {obj["kind"] for _, obj, _ in _workloads()}
    assert {"Deployment", "StatefulSet", "Job", "DaemonSet"} <= kinds


@pytest.mark.parametrize(
    "where,obj,spec",
    _workloads(),
    ids=[f"{o['kind']}/{o['metadata']['name']}" for _, o, _ in _workloads()],
)
def test_workload_security_and_resources(where: str, obj: dict, spec: dict):
    name = f"{where}: {obj['kind']}/{obj['metadata']['name']}"
    root_ok = (obj["kind"], obj["metadata"]["name"]) in ROOT_ALLOWED
    pod_sc = spec.get("securityContext") or {}
    assert spec.get("automountServiceAccountToken") is False, f"{name}: mount no SA token"
    for c in all_containers(spec):
        cname = f"{name} container {c['name']}"
        sc = c.get("securityContext") or {}
        # resources
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            for key in ("cpu", "memory"):
                assert key in (res.get(part) or {}), f"{cname}: resources.{part}.{key} missing"
        # privilege
        assert sc.get("allowPrivilegeEscalation") is False, f"{cname}: allowPrivilegeEscalation"
        assert sc.get("privileged") in (None, False), f"{cname}: privileged"
        assert (sc.get("capabilities") or {}).get("drop") == ["ALL"], f"{cname}: drop ALL caps"
        assert not (sc.get("capabilities") or {}).get("add"), f"{cname}: adds capabilities"
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        assert seccomp == "RuntimeDefault", f"{cname}: seccompProfile RuntimeDefault"
        if not root_ok:
            non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            assert non_root is True, f"{cname}: runAsNonRoot"
            assert uid is None or uid > 0, f"{cname}: runAsUser 0"
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")


_IMAGE_RE = re.compile(
    r"^(?P<name>(?:[a-z0-9.-]+(?::[0-9]+)?/)?[a-z0-9._-]+(?:/[a-z0-9._-]+)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@sha256:[0-9a-f]{64})?$"
)


def _image_is_pinned(image: str) -> bool:
    match = _IMAGE_RE.match(image)
    if not match:
        return False
    tag = match.group("tag")
    return "@sha256:" in image or (
        tag is not None and tag != "latest" and not tag.startswith("latest-")
    )


def test_image_pin_check_can_fail():
    assert not _image_is_pinned("minio/minio")
    assert not _image_is_pinned("minio/minio:latest")
    assert not _image_is_pinned("ghcr.io/mlflow/mlflow:latest-full")
    assert _image_is_pinned("quay.io/minio/minio:RELEASE.2025-09-07T16-13-09Z")
    assert _image_is_pinned("localhost:5000/x@sha256:" + "a" * 64)
    assert _image_is_pinned("postgres:17.6-bookworm")
    assert not _image_is_pinned("localhost:5000/x")


def test_every_image_is_pinned():
    images = []
    for where, obj, spec in _workloads():
        for c in all_containers(spec):
            images.append((f"{where}: {obj['kind']}/{obj['metadata']['name']}", c["image"]))
            assert c.get("imagePullPolicy", "IfNotPresent") == "IfNotPresent", c["name"]
    for config in sorted((K8S_DIR / "kind").glob("*.yaml")):
        cluster = yaml.safe_load(config.read_text())
        assert cluster["kind"] == "Cluster" and cluster["apiVersion"] == "kind.x-k8s.io/v1alpha4"
        for node in cluster["nodes"]:
            assert "@sha256:" in node.get("image", ""), (
                f"{rel(config)}: pin the node image by digest"
            )
            images.append((rel(config), node["image"]))
    assert images
    unpinned = [f"{where}: {image}" for where, image in images if not _image_is_pinned(image)]
    assert not unpinned, "unpinned images:\n" + "\n".join(unpinned)


def test_kind_gpu_config_mounts_all_gpus():
    cluster = yaml.safe_load((K8S_DIR / "kind" / "cluster-gpu.yaml").read_text())
    mounts = [m for n in cluster["nodes"] for m in n.get("extraMounts", [])]
    assert {
        "hostPath": "/dev/null",
        "containerPath": "/var/run/nvidia-container-devices/all",
    } in mounts


# ------------------------------------------------------------------ secrets

_CREDENTIAL_PATTERNS = [
    re.compile(r"minioadmin", re.I),
    re.compile(r"minio123"),
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(
        r"(?i)(password|secret[_-]?access[_-]?key|access[_-]?key[_-]?id)\s*[:=]\s*['\"]?"
        r"(?!\$|%s|\{\{)[A-Za-z0-9+/]{8,}"
    ),
    re.compile(r"postgres(?:ql)?(?:\+\w+)?://[^:\s/]+:(?!\$)[^@\s]+@"),  # $(VAR)/$VAR: a reference
]

_SCANNED = ["k8s", "images", "mk", ".github/workflows", "docs/cluster.md", ".dockerignore"]


def _scanned_files() -> list[Path]:
    files: list[Path] = []
    for entry in _SCANNED:
        path = REPO_ROOT / entry
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(p for p in sorted(path.rglob("*")) if p.is_file())
    return files


def test_no_secret_objects_with_values_committed():
    offenders = []
    for path in (REPO_ROOT / "k8s").rglob("*"):
        if path.suffix not in {".yaml", ".yml", ".json"} or not path.is_file():
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if (
                isinstance(doc, dict)
                and doc.get("kind") == "Secret"
                and (doc.get("data") or doc.get("stringData"))
            ):
                offenders.append(rel(path))
        kust = yaml.safe_load(path.read_text()) if path.name == "kustomization.yaml" else None
        if kust and kust.get("secretGenerator"):
            offenders.append(f"{rel(path)} (secretGenerator)")
    for where, obj in _all_rendered():
        if obj["kind"] == "Secret":
            offenders.append(f"{where}: renders Secret/{obj['metadata']['name']}")
    assert not offenders, (
        "Secret values must be generated at deploy time, not committed:\n" + "\n".join(offenders)
    )


def test_no_credential_literals():
    assert _CREDENTIAL_PATTERNS[4].search("password: hunter2hunter2")  # the scan can fail
    assert _CREDENTIAL_PATTERNS[5].search("postgresql://mlflow:s3cret@db:5432/mlflow")
    hits = []
    for path in _scanned_files():
        text = path.read_text(errors="replace")
        for pattern in _CREDENTIAL_PATTERNS:
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                hits.append(f"{rel(path)}:{line}: {match.group(0)[:40]}")
    assert not hits, "possible credentials committed:\n" + "\n".join(hits)


def test_sensitive_env_comes_from_secrets():
    sensitive = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN", re.I)
    bad = []
    for where, obj, spec in _workloads():
        for c in all_containers(spec):
            for env in c.get("env") or []:
                if sensitive.search(env["name"]) and "value" in env:
                    bad.append(f"{where}: {obj['metadata']['name']}/{c['name']}: {env['name']}")
    assert not bad, "literal values for sensitive env vars:\n" + "\n".join(bad)


def test_scripts_are_valid_bash():
    scripts = sorted((K8S_DIR / "scripts").glob("*.sh"))
    assert scripts
    for script in scripts:
        result = run(["bash", "-n", str(script)])
        assert result.returncode == 0, f"{rel(script)}: {result.stderr}"
        assert script.stat().st_mode & 0o111, f"{rel(script)} must be executable"


def test_kubectl_tool_is_real():
    result = run([find_tool("kubectl"), "version", "--client"])
    assert result.returncode == 0 and "Client Version" in result.stdout
