#!/usr/bin/env bash
# Build the Labyard Kubernetes testbed binaries once and cache them outside the repo.
#
#   tests/k8s/build/build.sh            # build (no-op when the cache for these pins exists)
#   tests/k8s/build/build.sh --print    # print the bin dir for these pins (built or not)
#
# Pins: Kubernetes and etcd through the two small modules beside this script (go.mod+go.sum),
# kwok and helm through `go install` at the versions below. The cache key hashes every input,
# so changing a pin gives a new bin dir and the old one can be deleted.
#
# Cache layout (LABYARD_TESTBED_CACHE, default ~/.cache/labyard-testbed):
#   go/mod  go/path  go/build     GOMODCACHE, GOPATH, GOCACHE (shared by all builds)
#   <hash>/bin                    kube-apiserver kube-controller-manager kube-scheduler kubectl
#                                 etcd kwok helm
set -euo pipefail

KUBE_VERSION=v1.36.3     # must match tests/k8s/build/kube/go.mod
ETCD_VERSION=v3.6.16     # must match tests/k8s/build/etcd/go.mod
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.22.0

main() {
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${LABYARD_TESTBED_CACHE:-$HOME/.cache/labyard-testbed}"

command -v go >/dev/null || export PATH="/usr/local/go/bin:$PATH"
export GOTOOLCHAIN=local
export GOMODCACHE="$cache/go/mod" GOPATH="$cache/go/path" GOCACHE="$cache/go/build"
export GOFLAGS="-modcacherw -trimpath" CGO_ENABLED=0

BUILD_REV=1             # bump when the build steps below change in a way that changes the binaries

key="$( {
    echo "$KUBE_VERSION $ETCD_VERSION $KWOK_VERSION $HELM_VERSION $BUILD_REV"
    go env GOVERSION GOOS GOARCH
    cat "$here/kube/go.mod" "$here/kube/go.sum" "$here/etcd/go.mod" "$here/etcd/go.sum"
} | sha256sum | cut -c1-16)"
bin="$cache/$key/bin"

# kwok's own stage files (node and pod lifecycles), taken from its module at the pinned version;
# `testbed up` adds a selector to the pod stages so kwok leaves opted-in (run-local) pods alone.
stages() {
    local dst="$cache/$key/kwok-stages" src
    [[ -f "$dst/.complete" ]] && return 0
    src="$(go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')"
    mkdir -p "$dst"
    cp "$src/kustomize/stage/node/fast/node-initialize.yaml" \
       "$src/kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml" \
       "$src"/kustomize/stage/pod/fast/pod-*.yaml "$dst/"
    chmod u+w "$dst"/*.yaml
    touch "$dst/.complete"
}

if [[ "${1:-}" == "--print" ]]; then echo "$bin"; return 0; fi
if [[ -f "$bin/.complete" ]]; then stages; echo "$bin"; return 0; fi

mkdir -p "$bin.tmp"
log() { printf '[testbed build %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
t0=$(date +%s)

# --- build steps ---
minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
kube_ld="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    kube_ld+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    kube_ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
kube() {
    # One `go build` for the four Kubernetes commands: they share most packages, and the go
    # command schedules their compile graph over the cores itself.
    log "kubernetes $KUBE_VERSION (kube-apiserver kube-controller-manager kube-scheduler kubectl)"
    (cd "$here/kube" && go build -ldflags "$kube_ld" -o "$bin.tmp/" \
        k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
    log "kubernetes done"
}
others() {
    log "etcd $ETCD_VERSION"
    (cd "$here/etcd" && go build -ldflags "-s -w" -o "$bin.tmp/etcd" go.etcd.io/etcd/server/v3)
    log "kwok $KWOK_VERSION"
    GOBIN="$bin.tmp" go install -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" \
        "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
    log "helm $HELM_VERSION"
    GOBIN="$bin.tmp" go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
        "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
    log "etcd, kwok, helm done"
}
if [[ "${LABYARD_TESTBED_BUILD_PARALLEL:-1}" == 1 ]]; then
    # Kubernetes and the chain etcd -> kwok -> helm side by side: the go command already keeps
    # both cores busy while compiling, but the links (single-threaded) and module downloads
    # overlap. Measured with a warm GOCACHE: 111 s side by side vs 194 s one after the other.
    kube & kpid=$!
    others & opid=$!
    wait "$kpid"; wait "$opid"
else
    kube
    others
fi
# --- end of build steps ---

stages
touch "$bin.tmp/.complete"
rm -rf "$bin"; mv "$bin.tmp" "$bin"
log "done in $(( $(date +%s) - t0 )) s: $bin"
echo "$bin"
}

# The whole script is one function, so bash has read all of it before it runs any of it.
main "$@"
