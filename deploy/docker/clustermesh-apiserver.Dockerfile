# The clustermesh-apiserver image. From the repository root:
#   docker build -f deploy/docker/clustermesh-apiserver.Dockerfile \
#     -t mesh.invalid/clustermesh-apiserver:0.1.0 .
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
    cargo build --release --locked -p clustermesh-apiserver --bin clustermesh-apiserver \
 && mkdir -p /out \
 && cp target/release/clustermesh-apiserver /out/

FROM docker.io/library/debian:${DEBIAN_RELEASE}-slim
# CA roots for a --kubeconfig that points at an API server with a public
# certificate; in-cluster, the service account's CA is used.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/clustermesh-apiserver /usr/local/bin/clustermesh-apiserver
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/clustermesh-apiserver"]
