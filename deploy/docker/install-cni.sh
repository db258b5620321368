#!/usr/bin/env bash
# Installs the mesh-cni plugin and its network configuration on a node. Run
# by the install-cni init container of the node-agent DaemonSet, with the
# host's CNI directories mounted; every file is written under a temporary
# name and renamed, so the runtime never reads half of one.
#
# Environment (defaults in brackets):
#   CNI_BIN_DIR    where the runtime looks for plugins [/host/opt/cni/bin]
#   CNI_CONF_DIR   where it looks for network configs [/host/etc/cni/net.d]
#   CNI_CONF_NAME  the config's file name [05-mesh.conflist]
#   AGENT_SOCKET   the node agent's --cni-socket [/run/mesh/cni.sock]
#   MESH_CNI       the plugin binary to install [/usr/local/bin/mesh-cni]
set -euo pipefail

bin_dir=${CNI_BIN_DIR:-/host/opt/cni/bin}
conf_dir=${CNI_CONF_DIR:-/host/etc/cni/net.d}
conf_name=${CNI_CONF_NAME:-05-mesh.conflist}
socket=${AGENT_SOCKET:-/run/mesh/cni.sock}
plugin=${MESH_CNI:-/usr/local/bin/mesh-cni}

die() {
    echo "install-cni: $*" >&2
    exit 1
}

[[ -x $plugin ]] || die "$plugin is missing or not executable"
[[ $conf_name =~ ^[A-Za-z0-9._-]+\.conflist$ ]] ||
    die "CNI_CONF_NAME=$conf_name: expected a file name ending in .conflist"
# The socket goes into JSON unquoted by any tool: allow only plain paths.
[[ $socket =~ ^/[A-Za-z0-9._/-]+$ ]] ||
    die "AGENT_SOCKET=$socket: expected an absolute path of [A-Za-z0-9._/-]"

mkdir -p "$bin_dir" "$conf_dir"

tmp_bin="$bin_dir/.mesh-cni.$$"
cp "$plugin" "$tmp_bin"
chmod 0755 "$tmp_bin"
mv -f "$tmp_bin" "$bin_dir/mesh-cni"

# mesh-cni reads cniVersion, name, type and agentSocket (node-agent/src/cni).
tmp_conf="$conf_dir/.$conf_name.$$"
# printf, not a here-document: bash may back one with a file in /tmp, and the
# root file system is read-only.
printf '%s\n' \
    '{' \
    '  "cniVersion": "1.0.0",' \
    '  "name": "mesh",' \
    '  "plugins": [' \
    '    {' \
    '      "type": "mesh-cni",' \
    "      \"agentSocket\": \"$socket\"" \
    '    }' \
    '  ]' \
    '}' >"$tmp_conf"
chmod 0644 "$tmp_conf"
mv -f "$tmp_conf" "$conf_dir/$conf_name"

echo "install-cni: installed $bin_dir/mesh-cni and $conf_dir/$conf_name (agent socket $socket)"
