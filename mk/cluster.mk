# Cluster path: images, a local kind/minikube cluster, KFP 2.17.0 + the dlu stack, port-forwards.
#
# Included by the top-level Makefile; also usable alone:  make -f mk/cluster.mk deploy
# Every target is documented with "## ..." for `make help`. Tools come from PATH (kubectl,
# kind, minikube, docker or podman) and can be overridden: make deploy KUBECTL=.venv/bin/kubectl
#
# Typical use (docs/cluster.md):
#   make cluster-up deploy images kind-load        # CLUSTER=kind (default) | minikube, GPU=0|1
#   make pipeline-upload                           # compiles with DLU_IMAGE_REPO/DLU_IMAGE_TAG
#   make kfp-ui        / make mlflow-port-forward  / make minio-console

DLU_ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))/..)

# ---------------------------------------------------------------- tools and knobs
KUBECTL ?= kubectl
KIND ?= kind
MINIKUBE ?= minikube
CONTAINER_ENGINE ?= $(shell command -v docker >/dev/null 2>&1 && echo docker || echo podman)
# podman's default open-files ulimit cannot be set on some machines ("error setting rlimit type 7");
# the project's settings avoid it. A CONTAINERS_CONF of your own wins.
PODMAN_CONF := $(DLU_ROOT)/images/podman-containers.conf
ifneq ($(findstring podman,$(CONTAINER_ENGINE)),)
ifeq ($(origin CONTAINERS_CONF),undefined)
export CONTAINERS_CONF := $(PODMAN_CONF)
endif
endif

CLUSTER ?= kind
GPU ?= 0
KIND_CLUSTER_NAME ?= dlu
MINIKUBE_PROFILE ?= dlu
MINIKUBE_CPUS ?= 4
MINIKUBE_MEMORY ?= 12g
DEPLOY_TIMEOUT ?= 900s

# ---------------------------------------------------------------- image names
# dl-uncertainty:<TAG> (cpu) and dl-uncertainty:<TAG>-cuda; TAG = 12-char commit, "-dirty" if the
# tracked tree has changes. Never ":latest": a fixed tag is what makes IfNotPresent load the
# image that was just built into kind/minikube.
_DLU_GIT_SHA := $(shell git -C $(DLU_ROOT) rev-parse --short=12 HEAD 2>/dev/null || echo nogit)
_DLU_GIT_DIRTY := $(shell test -z "$$(git -C $(DLU_ROOT) status --porcelain --untracked-files=no 2>/dev/null)" || echo -dirty)
IMAGE_REPO ?= dl-uncertainty
IMAGE_TAG ?= $(_DLU_GIT_SHA)$(_DLU_GIT_DIRTY)
IMAGE_VARIANTS ?= cpu cuda
IMAGE_BUILD_ARGS ?=
# The CPU image's base, when not images/Dockerfile's pinned python image (CPU_BASE_IMAGE there). A
# machine that cannot pull it builds one from Debian's packages with `make offline-base`:
#   make image-cpu CONTAINER_ENGINE=podman CPU_BASE_IMAGE=$(make -s offline-base)
CPU_BASE_IMAGE ?=
# podman writes OCI images by default, which drop the Dockerfile's SHELL; docker format keeps it.
_BUILD_FORMAT := $(if $(findstring podman,$(CONTAINER_ENGINE)),--format docker,)

_dlu_image = $(IMAGE_REPO):$(IMAGE_TAG)$(if $(filter cuda,$(1)),-cuda,)
IMAGE_CPU := $(call _dlu_image,cpu)
IMAGE_CUDA := $(call _dlu_image,cuda)
DLU_IMAGES := $(foreach v,$(IMAGE_VARIANTS),$(call _dlu_image,$(v)))

# The pipeline compiler (components/images.py) reads these.
export DLU_IMAGE_REPO := $(IMAGE_REPO)
export DLU_IMAGE_TAG := $(IMAGE_TAG)

K8S_DIR := $(DLU_ROOT)/k8s
KIND_CONFIG := $(K8S_DIR)/kind/$(if $(filter 1 true yes,$(GPU)),cluster-gpu.yaml,cluster.yaml)

.PHONY: images image-cpu image-cuda offline-base image-names kind-load minikube-load cluster-load \
        cluster-up cluster-down deploy deploy-kfp deploy-dlu undeploy cluster-status \
        mlflow-port-forward kfp-ui minio-console serve-deploy

# ---------------------------------------------------------------- images
images: $(addprefix image-,$(IMAGE_VARIANTS)) ## build the runtime images dl-uncertainty:<TAG>[-cuda] (IMAGE_VARIANTS="cpu cuda")

image-cpu: ## build the CPU image dl-uncertainty:<TAG>
	cd $(DLU_ROOT) && $(CONTAINER_ENGINE) build $(_BUILD_FORMAT) -f images/Dockerfile --build-arg VARIANT=cpu --build-arg GIT_SHA=$(_DLU_GIT_SHA) $(if $(CPU_BASE_IMAGE),--build-arg CPU_BASE_IMAGE=$(CPU_BASE_IMAGE)) $(IMAGE_BUILD_ARGS) -t $(IMAGE_CPU) .

image-cuda: ## build the CUDA image dl-uncertainty:<TAG>-cuda
	cd $(DLU_ROOT) && $(CONTAINER_ENGINE) build $(_BUILD_FORMAT) -f images/Dockerfile --build-arg VARIANT=cuda --build-arg GIT_SHA=$(_DLU_GIT_SHA) $(IMAGE_BUILD_ARGS) -t $(IMAGE_CUDA) .

offline-base: ## build a Python base for image-cpu without a registry (podman, root, debootstrap); prints its name
	@CONTAINER_ENGINE=$(CONTAINER_ENGINE) $(DLU_ROOT)/images/offline-base/build.sh

image-names: ## print the image references the pipeline will use
	@for image in $(DLU_IMAGES); do echo "$$image"; done

# podman keeps a local build as localhost/<name>; a pod asks for the name as the node's containerd
# spells it out: dl-uncertainty:<tag> is docker.io/library/dl-uncertainty:<tag>, me/x:<tag> is
# docker.io/me/x:<tag>, and a name starting with a registry (a dot or a port: ghcr.io/me/x) is itself.
# So the archive is saved under that full name.
_pod_image_name = name="$${image\#localhost/}"; \
	  case "$$name" in \
	    */*) case "$${name%%/*}" in *.*|*:*|localhost) full="$$name";; *) full="docker.io/$$name";; esac;; \
	    *) full="docker.io/library/$$name";; \
	  esac
_archive_image = archive="$$(mktemp -t dlu-image-XXXXXX.tar)"; trap 'rm -f "$$archive"' EXIT; \
	  $(_pod_image_name); \
	  $(CONTAINER_ENGINE) tag "$$image" "$$full"; $(CONTAINER_ENGINE) save -o "$$archive" "$$full"

kind-load: ## load the built images into the kind cluster (KIND_CLUSTER_NAME=dlu)
	@set -e; for image in $(DLU_IMAGES); do \
	  echo "kind-load: $$image -> $(KIND_CLUSTER_NAME)"; \
	  if [ "$(CONTAINER_ENGINE)" = docker ]; then \
	    $(KIND) load docker-image --name $(KIND_CLUSTER_NAME) "$$image"; \
	  else ( set -e; \
	    $(_archive_image); \
	    $(KIND) load image-archive --name $(KIND_CLUSTER_NAME) "$$archive" ); \
	  fi; \
	done

minikube-load: ## load the built images into minikube (MINIKUBE_PROFILE=dlu)
	@set -e; for image in $(DLU_IMAGES); do \
	  echo "minikube-load: $$image -> $(MINIKUBE_PROFILE)"; \
	  if [ "$(CONTAINER_ENGINE)" = docker ]; then \
	    $(MINIKUBE) -p $(MINIKUBE_PROFILE) image load "$$image"; \
	  else ( set -e; \
	    $(_archive_image); \
	    $(MINIKUBE) -p $(MINIKUBE_PROFILE) image load "$$archive" ); \
	  fi; \
	done

cluster-load: $(CLUSTER)-load ## load the images into the current CLUSTER (kind|minikube)

# ---------------------------------------------------------------- cluster lifecycle
cluster-up: ## create the local cluster (CLUSTER=kind|minikube, GPU=1 for the host's GPUs); no-op if it exists
ifeq ($(CLUSTER),kind)
	@if $(KIND) get clusters 2>/dev/null | grep -qx '$(KIND_CLUSTER_NAME)'; then \
	  echo "cluster-up: kind cluster $(KIND_CLUSTER_NAME) already exists"; \
	else \
	  $(KIND) create cluster --name $(KIND_CLUSTER_NAME) --config $(KIND_CONFIG) --wait 180s; \
	fi
ifneq ($(filter 1 true yes,$(GPU)),)
	ENGINE=$(CONTAINER_ENGINE) KIND=$(KIND) $(K8S_DIR)/scripts/kind-gpu-node-setup.sh $(KIND_CLUSTER_NAME)
endif
	$(KUBECTL) config use-context kind-$(KIND_CLUSTER_NAME)
else ifeq ($(CLUSTER),minikube)
	$(MINIKUBE) start -p $(MINIKUBE_PROFILE) --driver docker --container-runtime docker \
	  --cpus $(MINIKUBE_CPUS) --memory $(MINIKUBE_MEMORY) --cni calico \
	  $(if $(filter 1 true yes,$(GPU)),--gpus all,)
	$(KUBECTL) config use-context $(MINIKUBE_PROFILE)
else
	$(error CLUSTER must be kind or minikube, not '$(CLUSTER)')
endif

cluster-down: ## delete the local cluster and everything in it
ifeq ($(CLUSTER),kind)
	$(KIND) delete cluster --name $(KIND_CLUSTER_NAME)
else ifeq ($(CLUSTER),minikube)
	$(MINIKUBE) delete -p $(MINIKUBE_PROFILE)
else
	$(error CLUSTER must be kind or minikube, not '$(CLUSTER)')
endif

# ---------------------------------------------------------------- deploy
deploy: ## install KFP 2.17.0 + MinIO/MLflow/PostgreSQL (idempotent), then wait until ready
	$(KUBECTL) apply -k $(K8S_DIR)/kfp/cluster-scoped
	$(KUBECTL) wait --for condition=established --timeout=120s crd --all
	$(KUBECTL) apply -f $(K8S_DIR)/dlu/namespace.yaml
	KUBECTL="$(KUBECTL)" $(K8S_DIR)/scripts/ensure-secrets.sh
	$(KUBECTL) -n dlu delete job minio-buckets --ignore-not-found --wait=true
	$(KUBECTL) apply -k $(K8S_DIR)/dlu
	$(KUBECTL) apply -k $(K8S_DIR)/kfp/platform
ifneq ($(filter 1 true yes,$(GPU)),)
ifeq ($(CLUSTER),kind)
	$(KUBECTL) apply -k $(K8S_DIR)/nvidia
endif
endif
	$(KUBECTL) -n dlu rollout status deployment/minio --timeout=$(DEPLOY_TIMEOUT)
	$(KUBECTL) -n dlu wait --for=condition=complete job/minio-buckets --timeout=$(DEPLOY_TIMEOUT)
	$(KUBECTL) -n dlu rollout status statefulset/mlflow-postgres --timeout=$(DEPLOY_TIMEOUT)
# idempotent: also gives a volume initialised before the script existed Optuna's role and database
	$(KUBECTL) -n dlu exec mlflow-postgres-0 -c postgres -- sh /docker-entrypoint-initdb.d/10-optuna.sh
	$(KUBECTL) -n dlu rollout status deployment/mlflow --timeout=$(DEPLOY_TIMEOUT)
	$(KUBECTL) -n kubeflow wait --for=condition=Available deployment --all --timeout=$(DEPLOY_TIMEOUT)
	@echo "deploy: ready. KFP UI: make kfp-ui (http://localhost:8080); MLflow: make mlflow-port-forward (http://localhost:5000)"

serve-deploy: ## the champion as a KServe InferenceService in dlu (needs KServe; image from `make images kind-load`)
	$(KUBECTL) kustomize $(K8S_DIR)/serving | sed 's|dl-uncertainty:serve-image-tag|$(IMAGE_CPU)|' | $(KUBECTL) apply -f -
	$(KUBECTL) -n dlu wait --for=condition=Ready --timeout=$(DEPLOY_TIMEOUT) inferenceservice/dl-uncertainty
	@echo "serve-deploy: ready. Try: kubectl -n dlu port-forward svc/dl-uncertainty-predictor 8080:80 &"

undeploy: ## remove the dlu stack and KFP from the cluster (keeps the cluster; deletes MinIO/PostgreSQL data)
	-$(KUBECTL) delete -k $(K8S_DIR)/kfp/platform --ignore-not-found
	-$(KUBECTL) delete namespace dlu --ignore-not-found
	-$(KUBECTL) -n kubeflow delete secret dlu-s3-credentials --ignore-not-found
	-$(KUBECTL) delete -k $(K8S_DIR)/kfp/cluster-scoped --ignore-not-found

cluster-status: ## show the pods of KFP (kubeflow) and of the dlu stack
	$(KUBECTL) -n dlu get pods,svc,pvc,job
	$(KUBECTL) -n kubeflow get pods

# ---------------------------------------------------------------- access
mlflow-port-forward: ## MLflow UI/API on http://localhost:5000 (Ctrl-C to stop)
	@echo "MLflow: http://localhost:5000   (export MLFLOW_TRACKING_URI=http://localhost:5000)"
	$(KUBECTL) -n dlu port-forward svc/mlflow 5000:5000

kfp-ui: ## Kubeflow Pipelines UI (and API for the kfp client) on http://localhost:8080
	@echo "Kubeflow Pipelines: http://localhost:8080   (KFP client host: http://localhost:8080)"
	$(KUBECTL) -n kubeflow port-forward svc/ml-pipeline-ui 8080:80

minio-console: ## MinIO console on http://localhost:9001 (credentials: see the printed command)
	@echo "MinIO console: http://localhost:9001"
	@echo "user/password: $(KUBECTL) -n dlu get secret dlu-s3-credentials -o go-template='{{range \$$k,\$$v := .data}}{{\$$k}}={{\$$v | base64decode}}{{\"\\n\"}}{{end}}'"
	$(KUBECTL) -n dlu port-forward svc/minio 9001:9001
