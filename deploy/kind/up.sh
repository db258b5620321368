#!/usr/bin/env bash
# Brings up 2 or 3 kind clusters (c1.yaml, c2.yaml, c3.yaml beside this
# script) running the mesh, and connects every pair of them:
#
#   1. builds the four images (deploy/docker) and loads them into every cluster;
#   2. per cluster: a PKI made with meshctl, the Secrets clustermesh-pki and
#      clustermesh-local, and `kubectl apply -k` of an overlay of
#      deploy/kubernetes written under the work directory (name, ID, readers);
#   3. per pair: the reader's certificate (`meshctl clustermesh export`) and
#      the Secret clustermesh-remote-configs that the agents read.
#
# Running it again is harmless: existing clusters are kept, the CAs too.
# Needs docker, kind (>= 0.23: Kubernetes >= 1.30 node images) and kubectl;
# meshctl runs from its image, so no Rust toolchain is needed here.
#
# Usage: deploy/kind/up.sh [--clusters 2|3] [--no-build]
#        deploy/kind/up.sh [--clusters 2|3] --write-overlays DIR
#          (only writes the kustomize overlays, DIR/c1 ..., and exits)
# Environment: KIND_NODE_IMAGE (a kindest/node image >= v1.30),
#              MESH_KIND_WORK (default: ${CARGO_TARGET_DIR:-target}/kind).
# Remove everything with deploy/kind/down.sh.
set -euo pipefail
shopt -s inherit_errexit

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
base="$root/deploy/kubernetes"

# The images deploy/kubernetes names; pulled from nowhere (.invalid), loaded
# into the nodes by kind, used with imagePullPolicy IfNotPresent.
registry=mesh.invalid
version=0.1.0
images=(etcd meshctl clustermesh-apiserver node-agent)

# Fixed per cluster N so that etcd's server certificate can name them before
# the Service exists: the cluster IP in 10.(100+N).0.0/16 (c<N>.yaml) that
# the local agents dial, and the node port the other clusters dial.
etcd_node_port=32379
etcd_service_port=2379

clusters=2
ips=()
build=1
overlays_only=

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

die() {
    echo "up.sh: $*" >&2
    exit 1
}

log() {
    echo "==> $*"
}

while [[ $# -gt 0 ]]; do
    case $1 in
    --clusters)
        [[ $# -ge 2 ]] || die "--clusters needs a value"
        clusters=$2
        shift 2
        ;;
    --clusters=*)
        clusters=${1#*=}
        shift
        ;;
    --no-build)
        build=0
        shift
        ;;
    --write-overlays)
        [[ $# -ge 2 ]] || die "--write-overlays needs a directory"
        overlays_only=$2
        shift 2
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    *) die "unknown argument: $1 (see --help)" ;;
    esac
done
[[ $clusters == 2 || $clusters == 3 ]] || die "--clusters must be 2 or 3, not $clusters"

name_of() { echo "c$1"; }
kind_name_of() { echo "mesh-c$1"; }
cluster_ip_of() { echo "10.$((100 + $1)).0.79"; }
# The apiserver's read-only gRPC API, for the node agents (pinned as well,
# so mesh-config can name it before the first apply).
grpc_ip_of() { echo "10.$((100 + $1)).0.80"; }

# kubectl against cluster N.
k() {
    local n=$1
    shift
    kubectl --context "kind-$(kind_name_of "$n")" "$@"
}

# meshctl from its image, on kind's Docker network (where the nodes' node
# ports are), writing into the work directory as the calling user.
run_meshctl() {
    docker run --rm --network kind --user "$(id -u):$(id -g)" \
        --volume "$work:$work" "$registry/meshctl:$version" "$@"
}

# The IPv4 InternalIPs of cluster N's nodes, into the array `ips`.
node_ips() {
    local all v4
    all=$(k "$1" get nodes -o \
        jsonpath='{range .items[*]}{range .status.addresses[?(@.type=="InternalIP")]}{.address}{"\n"}{end}{end}')
    v4=$(grep -v ':' <<<"$all") || die "cluster $(name_of "$1") has no node with an IPv4 InternalIP"
    mapfile -t ips <<<"$v4"
}

join_by() {
    local IFS=$1
    shift
    echo "$*"
}

# `kubectl create secret generic NAME ARGS...` as an idempotent apply.
apply_secret() {
    local n=$1 secret=$2
    shift 2
    k "$n" -n mesh-system create secret generic "$secret" "$@" \
        --dry-run=client -o yaml | k "$n" apply -f -
}

# The init container that keeps etcd user remote-<reader> in cluster N's etcd
# (a JSON 6902 patch; the same as deploy/kubernetes/overlays/example).
reader_patch() {
    local reader=$1
    cat <<EOF
- op: add
  path: /spec/template/spec/initContainers/-
  value:
    name: reader-$reader
    image: $registry/meshctl:$version
    imagePullPolicy: IfNotPresent
    args:
    - clustermesh
    - export
    - --cluster=\$(CLUSTER_NAME)
    - --reader=$reader
    - --pki-dir=/var/lib/mesh-pki
    - --endpoints=https://127.0.0.1:9872
    - --output=/var/lib/mesh-pki/readers
    env:
    - name: CLUSTER_NAME
      valueFrom:
        configMapKeyRef:
          name: mesh-config
          key: cluster-name
    securityContext:
      allowPrivilegeEscalation: false
      readOnlyRootFilesystem: true
      capabilities:
        drop: [ALL]
    volumeMounts:
    - name: admin-pki
      mountPath: /var/lib/mesh-pki
    - name: etcd-ca
      mountPath: /var/lib/mesh-pki/ca.crt
      subPath: ca.crt
      readOnly: true
    - name: etcd-ca
      mountPath: /var/lib/mesh-pki/ca.key
      subPath: ca.key
      readOnly: true
EOF
}

write_overlay() {
    local n=$1 dir=$2 m
    mkdir -p "$dir"
    cat >"$dir/kustomization.yaml" <<EOF
# Written by deploy/kind/up.sh for cluster $(name_of "$n").
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
- $(realpath --relative-to="$dir" "$base")
patches:
- path: cluster.yaml
- path: service.yaml
  target:
    version: v1
    kind: Service
    name: clustermesh-apiserver
- path: grpc-service.yaml
  target:
    version: v1
    kind: Service
    name: clustermesh-apiserver-grpc
- path: readers.yaml
  target:
    group: apps
    version: v1
    kind: Deployment
    name: clustermesh-apiserver
EOF
    cat >"$dir/cluster.yaml" <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: mesh-config
  namespace: mesh-system
data:
  cluster-name: $(name_of "$n")
  cluster-id: "$n"
  apiserver-url: http://$(grpc_ip_of "$n"):9870
EOF
    cat >"$dir/grpc-service.yaml" <<EOF
- op: add
  path: /spec/clusterIP
  value: $(grpc_ip_of "$n")
EOF
    cat >"$dir/service.yaml" <<EOF
- op: add
  path: /spec/clusterIP
  value: $(cluster_ip_of "$n")
- op: add
  path: /spec/ports/0/nodePort
  value: $etcd_node_port
EOF
    : >"$dir/readers.yaml"
    for ((m = 1; m <= clusters; m++)); do
        if [[ $m != "$n" ]]; then
            reader_patch "$(name_of "$m")" >>"$dir/readers.yaml"
        fi
    done
}

# Only the overlays (deploy/check.sh validates them offline).
if [[ -n $overlays_only ]]; then
    command -v realpath >/dev/null || die "realpath is not installed"
    for ((n = 1; n <= clusters; n++)); do
        write_overlay "$n" "$overlays_only/$(name_of "$n")"
    done
    exit 0
fi

for tool in docker kind kubectl realpath; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done

work=${MESH_KIND_WORK:-${CARGO_TARGET_DIR:-$root/target}/kind}
mkdir -p "$work"
work=$(cd "$work" && pwd)

# --- 1. images and clusters --------------------------------------------------

refs=()
for image in "${images[@]}"; do
    refs+=("$registry/$image:$version")
done

if [[ $build == 1 ]]; then
    for image in "${images[@]}"; do
        log "building $registry/$image:$version"
        docker build --file "$root/deploy/docker/$image.Dockerfile" \
            --tag "$registry/$image:$version" "$root"
    done
fi

node_image=()
if [[ -n ${KIND_NODE_IMAGE:-} ]]; then
    node_image=(--image "$KIND_NODE_IMAGE")
fi

existing=$(kind get clusters 2>/dev/null || true)
for ((n = 1; n <= clusters; n++)); do
    kind_name=$(kind_name_of "$n")
    if grep -qx "$kind_name" <<<"$existing"; then
        log "kind cluster $kind_name exists"
    else
        log "creating kind cluster $kind_name"
        kind create cluster --name "$kind_name" --config "$here/c$n.yaml" \
            ${node_image[@]+"${node_image[@]}"}
    fi
    log "loading the images into $kind_name"
    kind load docker-image --name "$kind_name" "${refs[@]}"
done

# --- 2. the mesh in each cluster ---------------------------------------------

for ((n = 1; n <= clusters; n++)); do
    name=$(name_of "$n")
    dir="$work/$name"
    pki="$dir/pki"
    node_ips "$n"

    log "$name: PKI in $pki (server certificate for 127.0.0.1, $(cluster_ip_of "$n"), ${ips[*]})"
    run_meshctl clustermesh enable --cluster "$name" --pki-dir "$pki" \
        --server-ip "$(join_by , 127.0.0.1 "$(cluster_ip_of "$n")" "${ips[@]}")"

    # The agents' config for their own cluster's etcd (user `local`),
    # relative paths: resolved beside the file wherever it is mounted.
    mkdir -p "$dir/local"
    cat >"$dir/local/etcd-config.yaml" <<EOF
endpoints:
- https://$(cluster_ip_of "$n"):$etcd_service_port
trusted-ca-file: ca.crt
cert-file: client.crt
key-file: client.key
EOF

    log "$name: namespace and Secrets"
    k "$n" apply -f "$base/namespace.yaml"
    apply_secret "$n" clustermesh-pki \
        --from-file=ca.crt="$pki/ca.crt" --from-file=ca.key="$pki/ca.key" \
        --from-file=server.crt="$pki/server.crt" --from-file=server.key="$pki/server.key"
    apply_secret "$n" clustermesh-local \
        --from-file=etcd-config.yaml="$dir/local/etcd-config.yaml" \
        --from-file=ca.crt="$pki/ca.crt" \
        --from-file=client.crt="$pki/client-local.crt" \
        --from-file=client.key="$pki/client-local.key"

    log "$name: kubectl apply -k $dir/overlay"
    write_overlay "$n" "$dir/overlay"
    k "$n" apply -k "$dir/overlay"
done

# A replica is ready when its etcd holds the complete export; wait until the
# Service has one (not for every replica: only the leader may export).
wait_etcd_ready() {
    local n=$1 i ready
    for ((i = 0; i < 120; i++)); do
        ready=$(k "$n" -n mesh-system get endpointslices \
            -l kubernetes.io/service-name=clustermesh-apiserver \
            -o jsonpath='{.items[*].endpoints[*].conditions.ready}' || true)
        if grep -qw true <<<"$ready"; then
            return 0
        fi
        sleep 5
    done
    die "cluster $(name_of "$n"): no clustermesh-apiserver replica became ready in 10 minutes; see kubectl --context kind-$(kind_name_of "$n") -n mesh-system describe pods"
}

for ((n = 1; n <= clusters; n++)); do
    log "$(name_of "$n"): waiting for the node agents and the clustermesh-apiserver"
    k "$n" -n mesh-system rollout status daemonset/node-agent --timeout=10m
    wait_etcd_ready "$n"
done

# --- 3. connect every pair ---------------------------------------------------

for ((src = 1; src <= clusters; src++)); do
    reader=$(name_of "$src")
    remote="$work/$reader/remote"
    rm -rf "$remote"
    mkdir -p "$remote"
    for ((dst = 1; dst <= clusters; dst++)); do
        [[ $dst != "$src" ]] || continue
        cluster=$(name_of "$dst")
        node_ips "$dst"
        endpoints=()
        node_cidrs=()
        for ip in "${ips[@]}"; do
            endpoints+=("https://$ip:$etcd_node_port")
            node_cidrs+=("$ip/32")
        done
        out="$work/$reader/export-$cluster"
        log "$reader reads $cluster: certificate of etcd user remote-$reader"
        run_meshctl clustermesh export --cluster "$cluster" --reader "$reader" \
            --pki-dir "$work/$cluster/pki" --endpoints "$(join_by , "${endpoints[@]}")" \
            --output "$out"
        for suffix in etcd-client-ca.crt etcd-client.crt etcd-client.key; do
            cp "$out/$cluster.$suffix" "$remote/$cluster.$suffix"
        done
        # Cilium's format with relative paths (the Secret is mounted
        # elsewhere than here), and the address spaces cluster $cluster may
        # claim: its pod ranges (c$dst.yaml) and its nodes.
        {
            echo "endpoints:"
            printf -- '- %s\n' "${endpoints[@]}"
            echo "trusted-ca-file: $cluster.etcd-client-ca.crt"
            echo "cert-file: $cluster.etcd-client.crt"
            echo "key-file: $cluster.etcd-client.key"
            echo "allowed-pod-cidrs: [10.$dst.0.0/16, 'fd00:10:$dst::/56']"
            echo "allowed-node-cidrs: [$(join_by , "${node_cidrs[@]}")]"
        } >"$remote/$cluster"
    done
    log "$reader: Secret clustermesh-remote-configs"
    apply_secret "$src" clustermesh-remote-configs --from-file="$remote"
done

# --- done ----------------------------------------------------------------------

status() {
    k "$1" -n mesh-system exec daemonset/node-agent -c node-agent -- \
        meshctl clustermesh status --status-socket=/run/mesh/status.sock
}

for ((n = 1; n <= clusters; n++)); do
    log "$(name_of "$n"): waiting for an agent to be connected to every cluster"
    for ((i = 0; ; i++)); do
        if status "$n" >/dev/null 2>&1; then
            break
        fi
        if ((i >= 60)); then
            status "$n" || true
            die "cluster $(name_of "$n") is not connected to the others after 5 minutes"
        fi
        sleep 5
    done
    status "$n"
done

cat <<EOF

The mesh runs in ${clusters} kind clusters (contexts kind-mesh-c1 .. kind-mesh-c${clusters}).
  status:  kubectl --context kind-mesh-c1 -n mesh-system exec daemonset/node-agent -c node-agent -- \\
             meshctl clustermesh status --status-socket=/run/mesh/status.sock
  remove:  $here/down.sh
Work directory (PKI, overlays, configs): $work
EOF
