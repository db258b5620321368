#!/usr/bin/env bash
# Makes a directory (default /sys/fs/bpf) a bpffs unless it already is one,
# so that the maps the node agent pins there outlive the agent. Run by the
# mount-bpf-fs init container of the node-agent DaemonSet, whose mount
# propagates to the host. Mounting over an existing bpffs would hide its
# pins, hence the check.
set -euo pipefail

dir=${BPFFS_DIR:-/sys/fs/bpf}
# BPF_FS_MAGIC, as `stat -f` prints a file system type in hex.
bpf_fs_magic=cafe4a11

fs_type() {
    stat -f -c %t "$1"
}

mkdir -p "$dir"
if [[ $(fs_type "$dir") == "$bpf_fs_magic" ]]; then
    echo "mount-bpffs: $dir is a bpffs already"
    exit 0
fi
mount -t bpf bpffs "$dir"
if [[ $(fs_type "$dir") != "$bpf_fs_magic" ]]; then
    echo "mount-bpffs: mounted bpffs on $dir, but it does not show as one" >&2
    exit 1
fi
echo "mount-bpffs: mounted bpffs on $dir"
