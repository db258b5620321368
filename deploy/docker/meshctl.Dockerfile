# The meshctl image: the init containers that set up etcd's users and roles
# in the clustermesh-apiserver pod, and deploy/kind/up.sh's PKI. From the
# repository root:
#   docker build -f deploy/docker/meshctl.Dockerfile -t mesh.invalid/meshctl:0.1.0 .
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
    cargo build --release --locked -p meshctl --bin meshctl \
 && mkdir -p /out \
 && cp target/release/meshctl /out/

FROM docker.io/library/debian:${DEBIAN_RELEASE}-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/meshctl /usr/local/bin/meshctl
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/meshctl"]
