#!/usr/bin/env bash
# Build (once) the Debian 12 root that every molecule test host boots from.
# Usage: build-root.sh CACHE_DIR   -> prints the root directory on stdout.
# The root is keyed by a hash of this script and packages.txt; a changed key builds a new one.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${1:?cache dir}"
key="$(cat "$0" "$here/packages.txt" | sha256sum | cut -c1-12)"
root="$cache/root-bookworm-$key"
if [[ -f "$root/.labyard-root-ready" ]]; then
  echo "$root"; exit 0
fi
log="$cache/build-root.log"
mkdir -p "$cache"
[[ -f "$root.tmp/.debootstrap-done" ]] || rm -rf "$root.tmp"
# Use the mirror this machine's apt already uses (never hard-coded here).
mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
if [[ -z "$mirror" ]]; then
  mirror="$(awk '$1=="deb" && $3 ~ /^bookworm$/ {print $2; exit}' /etc/apt/sources.list)"
fi
echo "building test root $root from $mirror (log: $log)" >&2
include=systemd,systemd-sysv,dbus,libpam-systemd,openssh-server,python3,python3-apt,iproute2,iputils-ping,ca-certificates,procps,locales-all
if [[ ! -f "$root.tmp/.debootstrap-done" ]]; then
  debootstrap --variant=minbase --include="$include" bookworm "$root.tmp" "$mirror" >>"$log" 2>&1
  touch "$root.tmp/.debootstrap-done"
fi
# Same apt sources as this machine (main + updates + security).
cp /etc/apt/sources.list.d/debian.sources "$root.tmp/etc/apt/sources.list.d/debian.sources"
rm -f "$root.tmp/etc/apt/sources.list"
# Keep downloaded .debs (the default docker-clean style hooks would delete them).
rm -f "$root.tmp/etc/apt/apt.conf.d/docker-clean"
echo 'APT::Keep-Downloaded-Packages "true";' > "$root.tmp/etc/apt/apt.conf.d/10labyard-keep-debs"
pkgs="$(grep -v '^#' "$here/packages.txt" | xargs)"
# Runs inside the root without booting it (nspawn isolates it from this machine's
# mounts and processes; only the download needs this machine's network).
systemd-nspawn --quiet --register=no --keep-unit -D "$root.tmp" --pipe /bin/sh -c \
  "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get -y -qq dist-upgrade && apt-get -y -qq --download-only install $pkgs" >>"$log" 2>&1
# SSH: the controller logs in as root with a key made for the test bed.
mkdir -p "$cache/ssh"
[[ -f "$cache/ssh/id_ed25519" ]] || ssh-keygen -q -t ed25519 -N '' -f "$cache/ssh/id_ed25519"
install -d -m 0700 "$root.tmp/root/.ssh"
install -m 0600 "$cache/ssh/id_ed25519.pub" "$root.tmp/root/.ssh/authorized_keys"
printf 'UseDNS no\nPermitRootLogin prohibit-password\n' > "$root.tmp/etc/ssh/sshd_config.d/labyard-test.conf"
# Network comes from the host's netns (configured from outside); no DHCP, no resolver.
: > "$root.tmp/etc/resolv.conf"
# No /etc/hostname: systemd takes the name nspawn --hostname gives each host.
rm -f "$root.tmp/etc/hostname"
printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' > "$root.tmp/etc/hosts"
# Units that cannot work or only slow down a container boot.
for u in systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer; do
  ln -sf /dev/null "$root.tmp/etc/systemd/system/$u"
done
rm -f "$root.tmp/.debootstrap-done"
touch "$root.tmp/.labyard-root-ready"
mv "$root.tmp" "$root"
echo "$root"
