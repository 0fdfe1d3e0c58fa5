"""The GPU set-up on kind: the NVIDIA runtime is opt-in (a RuntimeClass), never containerd's default,
and GPUs reach training pods as CDI devices; kubectl stays within one minor of the kind node."""

from __future__ import annotations

import re

import yaml
from k8s_helpers import K8S_DIR, render, run


def test_nvidia_runtime_is_a_runtime_class_not_the_default():
    objs = {(o["kind"], o["metadata"]["name"]): o for o in render(K8S_DIR / "nvidia")}
    assert objs[("RuntimeClass", "nvidia")]["handler"] == "nvidia"
    plugin = objs[("DaemonSet", "nvidia-device-plugin")]["spec"]["template"]["spec"]
    assert plugin["runtimeClassName"] == "nvidia"
    env = {e["name"]: e.get("value") for e in plugin["containers"][0]["env"]}
    assert env["DEVICE_LIST_STRATEGY"] == "cdi-cri"  # allocated GPUs only, no runtime class on the pod
    mounts = {m["mountPath"] for m in plugin["containers"][0]["volumeMounts"]}
    assert {"/var/run/cdi", "/driver-root", "/var/lib/kubelet/device-plugins"} <= mounts

    setup = (K8S_DIR / "scripts" / "kind-gpu-node-setup.sh").read_text()
    configure = [line for line in setup.splitlines() if "nvidia-ctk runtime configure" in line]
    assert configure and not any("--set-as-default" in line for line in configure)


def _kind_node_minor() -> int:
    for name in ("cluster.yaml", "cluster-gpu.yaml"):
        image = yaml.safe_load((K8S_DIR / "kind" / name).read_text())["nodes"][0]["image"]
        yield int(re.search(r"kindest/node:v1\.(\d+)\.", image)[1])


def test_kubectl_is_within_one_minor_of_the_kind_node(kubectl):
    client = run([kubectl, "version", "--client", "-o", "json"]).stdout
    minor = int(re.search(r'"minor":\s*"(\d+)', client)[1])
    for node in _kind_node_minor():
        assert abs(minor - node) <= 1, f"kubectl 1.{minor} vs kind node 1.{node}: kubectl supports +-1 minor"
