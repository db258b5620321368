#!/usr/bin/env bash
# The offline checks of deploy/ (no Kubernetes API server can run on the CI
# machines, and nothing here needs one):
#
#   a. a Python venv in ${CARGO_TARGET_DIR:-target}/deploy-venv with
#      kubernetes-validate (created when missing; needs the Debian package
#      python3-venv);
#   b. every Kubernetes object under deploy/kubernetes, file by file and as
#      rendered by each kustomization (and by the overlays deploy/kind/up.sh
#      writes), validated strictly against the Kubernetes 1.30 OpenAPI
#      schemas, plus lints the schemas cannot do, and the kind configs
#      (deploy/check/validate.py);
#   c. `bash -n` and shellcheck (Debian package shellcheck) on every shell
#      script under deploy/.
#
# Exits non-zero if anything fails. Usage: deploy/check.sh
set -euo pipefail
shopt -s inherit_errexit

# Pinned: its schemas cover Kubernetes 1.25 to 1.37; we validate against 1.30.
kubernetes_validate_version=1.37.0
kubernetes_version=1.30.0

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root"

python=${PYTHON:-python3}
venv="${CARGO_TARGET_DIR:-target}/deploy-venv"
marker="$venv/.kubernetes-validate-$kubernetes_validate_version"
failed=()

die() {
    echo "deploy/check.sh: $*" >&2
    exit 1
}

# --- a. the venv ------------------------------------------------------------

if [[ ! -f $marker ]]; then
    command -v "$python" >/dev/null || die "$python not found: install the Debian package python3"
    # Debian's python3 has the venv module but not ensurepip without
    # python3-venv, and `python3 -m venv` then fails half-way.
    if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
        die "\`$python -m venv\` is unavailable: install the Debian package python3-venv (apt-get install python3-venv)"
    fi
    echo "==> creating $venv with kubernetes-validate==$kubernetes_validate_version"
    rm -rf "$venv"
    "$python" -m venv "$venv" || die "\`$python -m venv $venv\` failed"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "kubernetes-validate==$kubernetes_validate_version" ||
        die "pip could not install kubernetes-validate==$kubernetes_validate_version"
    touch "$marker"
fi

# --- b. manifests -------------------------------------------------------------

echo "==> Kubernetes manifests (schemas of Kubernetes $kubernetes_version, strict)"
# The overlays deploy/kind/up.sh applies, written without touching kind.
kind_overlays=$(mktemp -d)
trap 'rm -rf -- "$kind_overlays"' EXIT
if ! bash deploy/kind/up.sh --clusters 3 --write-overlays "$kind_overlays"; then
    failed+=("deploy/kind/up.sh --write-overlays")
fi
overlay_args=()
for dir in "$kind_overlays"/*/; do
    [[ -f $dir/kustomization.yaml ]] && overlay_args+=(--kustomization "$dir")
done
if ! "$venv/bin/python" deploy/check/validate.py \
    --kubernetes-version "$kubernetes_version" \
    ${overlay_args[@]+"${overlay_args[@]}"} deploy; then
    failed+=("manifests")
fi

# --- c. shell scripts ---------------------------------------------------------

echo "==> shell scripts"
command -v shellcheck >/dev/null ||
    die "shellcheck not found: install the Debian package shellcheck (apt-get install shellcheck)"
mapfile -t scripts < <(find deploy -name '*.sh' -type f | sort)
[[ ${#scripts[@]} -gt 0 ]] || die "no shell scripts found under deploy/"
for script in "${scripts[@]}"; do
    if bash -n "$script" && shellcheck --shell=bash "$script"; then
        echo "ok    $script"
    else
        echo "FAIL  $script"
        failed+=("$script")
    fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "deploy/check.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "deploy/check.sh: all checks passed (${#scripts[@]} shell scripts)"
