# The node-agent image: the agent, the mesh-cni plugin and the scripts of the
# DaemonSet's init containers (mesh-install-cni, mesh-mount-bpffs), plus
# meshctl for `kubectl exec ... -- meshctl clustermesh status`. From the
# repository root:
#   docker build -f deploy/docker/node-agent.Dockerfile \
#     -t mesh.invalid/node-agent:0.1.0 .
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM docker.io/library/rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
# protoc and the protobuf well-known types (etcd-client and tonic generate
# code at build time); clang for the datapath's eBPF programs. The same
# line in every Dockerfile, so the layer is built once and shared.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev clang \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p node-agent -p meshctl \
      --bin node-agent --bin mesh-cni --bin meshctl \
 && mkdir -p /out \
 && cp target/release/node-agent target/release/mesh-cni target/release/meshctl /out/

FROM docker.io/library/debian:${DEBIAN_RELEASE}-slim
# The agent talks netlink and bpf() itself and runs no tools (no iproute2);
# the init scripts need only bash, coreutils and mount, which slim has.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/node-agent /out/mesh-cni /out/meshctl /usr/local/bin/
COPY deploy/docker/install-cni.sh /usr/local/bin/mesh-install-cni
COPY deploy/docker/mount-bpffs.sh /usr/local/bin/mesh-mount-bpffs
RUN chmod 0755 /usr/local/bin/mesh-install-cni /usr/local/bin/mesh-mount-bpffs
# Root: the DaemonSet grants the capabilities it needs and drops the rest.
ENTRYPOINT ["/usr/local/bin/node-agent"]
