#!/usr/bin/env bash
# Makes the GPUs handed to a kind node (k8s/kind/cluster-gpu.yaml) usable by its containerd:
# installs the NVIDIA Container Toolkit inside every node of the cluster and registers "nvidia" as
# an extra containerd runtime, NOT the default (as nvkind does): only pods of the "nvidia"
# RuntimeClass (the device plugin, k8s/nvidia) use it, and training pods get exactly their
# allocated GPUs as CDI devices. Idempotent. Run by `make cluster-up GPU=1`.
#
# usage: kind-gpu-node-setup.sh [cluster-name]     (env ENGINE=docker|podman, default docker)
set -euo pipefail

cluster="${1:-dlu}"
engine="${ENGINE:-docker}"
kind_bin="${KIND:-kind}"

nodes="$("$kind_bin" get nodes --name "$cluster")"
if [ -z "$nodes" ]; then
  echo "kind-gpu-node-setup: no nodes for kind cluster '$cluster'" >&2
  exit 1
fi

for node in $nodes; do
  echo "kind-gpu-node-setup: configuring $node"
  if ! "$engine" exec "$node" sh -c 'ls /dev/nvidia0 >/dev/null 2>&1'; then
    echo "kind-gpu-node-setup: $node sees no /dev/nvidia0; check the host set-up in docs/cluster.md" >&2
    exit 1
  fi
  "$engine" exec "$node" bash -euo pipefail -c '
    if ! command -v nvidia-ctk >/dev/null 2>&1; then
      apt-get update
      apt-get install -y --no-install-recommends gpg curl ca-certificates
      curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey \
        | gpg --dearmor --yes -o /usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
      curl -fsSL https://nvidia.github.io/libnvidia-container/stable/deb/nvidia-container-toolkit.list \
        | sed "s#deb https://#deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg] https://#g" \
        > /etc/apt/sources.list.d/nvidia-container-toolkit.list
      apt-get update
      apt-get install -y --no-install-recommends nvidia-container-toolkit
    fi
    nvidia-ctk runtime configure --runtime=containerd --config-source=file
    systemctl restart containerd
  '
done
echo "kind-gpu-node-setup: done; now run: make deploy GPU=1"
