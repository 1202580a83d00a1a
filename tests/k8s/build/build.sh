#!/usr/bin/env bash
# Build the Labyard Kubernetes testbed binaries once and cache them outside the repo.
#
#   tests/k8s/build/build.sh               # build (no-op when the cache for these pins exists)
#   tests/k8s/build/build.sh --print       # print the control plane's bin dir (built or not)
#   tests/k8s/build/build.sh --print-node  # print the real node's bin dir (built or not)
#
# Pins: Kubernetes, etcd, the node's Kubernetes commands and CoreDNS through the small modules
# beside this script (go.mod+go.sum), kwok, helm and kube-router through `go install` at the
# versions below. Each cache key hashes its inputs, so changing a pin gives a new bin dir and
# the old one can be deleted. The control plane and the real node have separate keys: adding
# or changing the node never rebuilds a control plane that is already cached.
#
# Cache layout (LABYARD_TESTBED_CACHE, default ~/.cache/labyard-testbed):
#   go/mod  go/path  go/build     GOMODCACHE, GOPATH, GOCACHE (shared by all builds)
#   <hash>/bin                    kube-apiserver kube-controller-manager kube-scheduler kubectl
#                                 etcd kwok helm
#   node-<hash>/bin               kubelet kube-proxy coredns kube-router pause
#   node-<hash>/images            pause and CoreDNS image archives (written by `testbed up`)
# LABYARD_TESTBED_REAL_NODE=0 builds the control plane only.
set -euo pipefail

KUBE_VERSION=v1.36.3     # must match tests/k8s/build/kube/go.mod
ETCD_VERSION=v3.6.16     # must match tests/k8s/build/etcd/go.mod
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.22.0
COREDNS_VERSION=v1.14.7      # must match tests/k8s/build/coredns/go.mod
KUBE_ROUTER_VERSION=v2.1.0   # NetworkPolicy enforcement only (firewall mode); see docs/dev/testbed.md

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

NODE_BUILD_REV=1        # the same, for the node's build steps
node_key="$( {
    echo "$KUBE_VERSION $COREDNS_VERSION $KUBE_ROUTER_VERSION $NODE_BUILD_REV"
    go env GOVERSION GOOS GOARCH
    gcc --version 2>/dev/null | head -1
    cat "$here/node/go.mod" "$here/node/go.sum" "$here/coredns/go.mod" "$here/coredns/go.sum" "$here/coredns/main.go"
} | sha256sum | cut -c1-16)"
nbin="$cache/node-$node_key/bin"

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
if [[ "${1:-}" == "--print-node" ]]; then echo "$nbin"; return 0; fi
need_cp=1 need_node=1
[[ -f "$bin/.complete" ]] && need_cp=0
[[ -f "$nbin/.complete" || "${LABYARD_TESTBED_REAL_NODE:-1}" == 0 ]] && need_node=0
if [[ $need_cp == 0 && $need_node == 0 ]]; then stages; echo "$bin"; return 0; fi

# The node module must build the very Kubernetes release of the control plane.
if ! diff <(sed -n '/^replace (/,/^)/p' "$here/kube/go.mod") <(sed -n '/^replace (/,/^)/p' "$here/node/go.mod") >/dev/null \
   || ! grep -q "k8s.io/kubernetes $KUBE_VERSION " "$here/node/go.mod"; then
    echo "tests/k8s/build/node/go.mod does not pin the control plane's Kubernetes ($KUBE_VERSION and the" \
         "replace block of kube/go.mod): update it as docs/dev/testbed.md says" >&2
    return 1
fi

[[ $need_cp == 1 ]] && mkdir -p "$bin.tmp"
[[ $need_node == 1 ]] && mkdir -p "$nbin.tmp"
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
node_kube() {
    # After the control plane's build, in the same GOCACHE: the packages they share (most of
    # client-go, apimachinery, api) are compiled once.
    log "node: kubernetes $KUBE_VERSION (kubelet kube-proxy)"
    (cd "$here/node" && go build -ldflags "$kube_ld" -o "$nbin.tmp/" \
        k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy)
    log "node: kubelet, kube-proxy done"
}
node_others() {
    log "node: coredns $COREDNS_VERSION"
    (cd "$here/coredns" && go build -ldflags "-s -w" -o "$nbin.tmp/coredns" .)
    log "node: kube-router $KUBE_ROUTER_VERSION"
    GOBIN="$nbin.tmp" go install \
        -ldflags "-s -w -X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=$KUBE_ROUTER_VERSION" \
        "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router@$KUBE_ROUTER_VERSION"
    log "node: pause (gcc -static, from the Kubernetes module)"
    local src
    src="$(cd "$here/node" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')"
    gcc -Os -Wall -Werror -static -DVERSION="$KUBE_VERSION-labyard" -o "$nbin.tmp/pause" "$src/build/pause/linux/pause.c"
    strip "$nbin.tmp/pause"
    log "node: coredns, kube-router, pause done"
}
chain_kube() { [[ $need_cp == 0 ]] || kube; [[ $need_node == 0 ]] || node_kube; }
chain_others() { [[ $need_cp == 0 ]] || others; [[ $need_node == 0 ]] || node_others; }
if [[ "${LABYARD_TESTBED_BUILD_PARALLEL:-1}" == 1 ]]; then
    # Kubernetes and the chain etcd -> kwok -> helm side by side: the go command already keeps
    # both cores busy while compiling, but the links (single-threaded) and module downloads
    # overlap. Measured with a warm GOCACHE: 111 s side by side vs 194 s one after the other.
    # The node's Kubernetes commands follow the control plane's; CoreDNS, kube-router and
    # pause follow helm.
    chain_kube & kpid=$!
    chain_others & opid=$!
    wait "$kpid"; wait "$opid"
else
    chain_kube
    chain_others
fi
# --- end of build steps ---

stages
if [[ $need_cp == 1 ]]; then
    touch "$bin.tmp/.complete"
    rm -rf "$bin"; mv "$bin.tmp" "$bin"
fi
if [[ $need_node == 1 ]]; then
    touch "$nbin.tmp/.complete"
    rm -rf "$nbin"; mv "$nbin.tmp" "$nbin"
fi
built=""; [[ $need_cp == 1 ]] && built+=" $bin"; [[ $need_node == 1 ]] && built+=" $nbin"
log "done in $(( $(date +%s) - t0 )) s:$built"
echo "$bin"
}

# The whole script is one function, so bash has read all of it before it runs any of it.
main "$@"
