#!/usr/bin/env bash
# Regenerates go.mod and go.sum of this module from the two pinned versions below.
#
# k8s.io/kubernetes points each of its staging modules (k8s.io/api, k8s.io/apiserver, …) at
# ./staging/… with version v0.0.0, which a consumer cannot resolve. The list of those modules is
# read from the .mod file the module proxy serves for the pinned release, and each one is
# replaced by its published v0.<minor>.<patch>, so no module name is typed here by hand.
#
# Run it after changing a version; commit go.mod and go.sum. .ci/kube-tools only builds.
set -euo pipefail
cd "$(dirname "$0")"

KUBERNETES_VERSION=v1.36.3   # v1.37.x needs Go 1.27
ETCD_VERSION=v3.7.1          # pairs with kube 1.36 (etcd 3.6 and 3.7 are both supported)
staging_version="v0.${KUBERNETES_VERSION#v1.}"

rm -f go.mod go.sum
go mod init github.com/dpc-operator/dpc-operator/tools/kube >&2
go mod edit -go=1.26

kube_mod=$(go mod download -json "k8s.io/kubernetes@${KUBERNETES_VERSION}" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
staging=$(sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\1#p' "$kube_mod" | sort -u)
count=$(printf '%s\n' "$staging" | grep -c .)
[ "$count" -ge 20 ] || { echo "only $count staging modules found in $kube_mod" >&2; exit 1; }
echo "replacing $count staging modules by ${staging_version}" >&2
for m in $staging; do
  go mod edit -replace="${m}=${m}@${staging_version}"
done

go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@${KUBERNETES_VERSION}" >&2
go get -tool "k8s.io/kubernetes/cmd/kube-controller-manager@${KUBERNETES_VERSION}" >&2
go get -tool "go.etcd.io/etcd/server/v3@${ETCD_VERSION}" >&2
go mod tidy >&2
echo "go.mod and go.sum written for kubernetes ${KUBERNETES_VERSION}, etcd ${ETCD_VERSION}" >&2
