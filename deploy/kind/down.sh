#!/usr/bin/env bash
# Deletes the kind clusters of deploy/kind/up.sh (mesh-c1 .. mesh-c3, those
# that exist) and its work directory (PKI, overlays, configs).
# Environment: MESH_KIND_WORK, as for up.sh.
set -euo pipefail
shopt -s inherit_errexit

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
work=${MESH_KIND_WORK:-${CARGO_TARGET_DIR:-$root/target}/kind}

command -v kind >/dev/null || {
    echo "down.sh: kind is not installed" >&2
    exit 1
}

existing=$(kind get clusters 2>/dev/null || true)
for n in 1 2 3; do
    if grep -qx "mesh-c$n" <<<"$existing"; then
        echo "==> deleting kind cluster mesh-c$n"
        kind delete cluster --name "mesh-c$n"
    fi
done
if [[ -d $work ]]; then
    echo "==> removing $work"
    rm -rf -- "$work"
fi
