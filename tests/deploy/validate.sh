#!/usr/bin/env bash
# Validates Kubernetes manifests against the Kubernetes OpenAPI schemas with the
# kubernetes-validate package (PyPI), in strict mode: unknown fields are errors.
#
#   tests/deploy/validate.sh VENV_DIR FILE...
#
# VENV_DIR is created (python3 -m venv, pip install) when it does not hold a complete
# install yet; tests/deploy.rs passes a directory under cargo's target dir.
# Fails when the venv cannot be made, when a document does not validate, and when the
# validator warns, as it does for an apiVersion/kind it has no schema for (a typo there
# would otherwise pass). `kind: List` has no schema either: tests/deploy.rs hands over
# the items of a List as documents of their own.
set -euo pipefail

KV_PACKAGE="kubernetes-validate==1.37.0"
# The oldest Kubernetes version the manifests are meant for.
K8S_VERSION="1.30.0"

if [ "$#" -lt 2 ]; then
    echo "usage: $0 VENV_DIR FILE..." >&2
    exit 2
fi
venv="$1"
shift

install_venv() {
    local stamp="$venv/.carousel-installed"
    if [ -x "$venv/bin/kubernetes-validate" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$KV_PACKAGE" ]; then
        return 0
    fi
    echo "creating $venv with $KV_PACKAGE" >&2
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$KV_PACKAGE"
    echo "$KV_PACKAGE" >"$stamp"
}

# Two test runs at once (cargo test and nextest, say) must not build the venv twice.
mkdir -p "$(dirname "$venv")"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$venv.lock"
    flock 9
fi
install_venv

status=0
for file in "$@"; do
    if ! out="$("$venv/bin/kubernetes-validate" --strict -k "$K8S_VERSION" "$file" 2>&1)"; then
        status=1
    fi
    printf '%s\n' "$out"
    if printf '%s\n' "$out" | grep -q '^WARN'; then
        echo "FAIL $file: a warning above (unknown kind or apiVersion?)" >&2
        status=1
    fi
    if ! printf '%s\n' "$out" | grep -q '^INFO .* passed for resource '; then
        echo "FAIL $file: no document was validated" >&2
        status=1
    fi
done
exit "$status"
