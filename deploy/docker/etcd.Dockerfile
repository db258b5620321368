# etcd for the clustermesh-apiserver pod: Debian's etcd-server (3.4), the
# same etcd the lab and the tests use. Needs no build context of its own; from
# the repository root:
#   docker build -f deploy/docker/etcd.Dockerfile -t mesh.invalid/etcd:0.1.0 .
ARG DEBIAN_RELEASE=bookworm

FROM docker.io/library/debian:${DEBIAN_RELEASE}-slim
ARG TARGETARCH
RUN apt-get update \
 && apt-get install -y --no-install-recommends etcd-server \
 && rm -rf /var/lib/apt/lists/*
# etcd 3.4 starts on architectures other than amd64 and ppc64le (arm64) only
# when this names the architecture; amd64 ignores it.
ENV ETCD_UNSUPPORTED_ARCH=${TARGETARCH}
USER 65532:65532
ENTRYPOINT ["/usr/bin/etcd"]
