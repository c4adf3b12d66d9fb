#!/usr/bin/env bash
# Unpack Debian's containerd of other suites (trixie: 1.7, sid: 2.x) beside the installed one, for
# the e2e matrix: <cache>/<suite>/usr/bin/{containerd,ctr,containerd-shim-runc-v2}. Nothing on the
# system changes: apt reads this machine's own Debian source with another suite into a private
# state dir, and the .deb is unpacked with dpkg -x, not installed. Idempotent; prints the bin dirs.
#   scripts/containerd-versions.sh [suite...]     (default: trixie sid)
#   ADDLOWER_CONTAINERD_CACHE=<dir>               (default: /var/cache/addlower-ci/containerd)
set -euo pipefail
cache=${ADDLOWER_CONTAINERD_CACHE:-/var/cache/addlower-ci/containerd}
sources=/etc/apt/sources.list.d/debian.sources
[ "$#" -gt 0 ] || set -- trixie sid
for suite in "$@"; do
  dir=$cache/$suite
  if [ ! -x "$dir/usr/bin/containerd" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$work/sources" "$work/lists/partial" "$work/cache/archives/partial"
    # The first stanza (the main archive) of this machine's source, with the other suite.
    awk -v suite="$suite" 'BEGIN { RS = ""; ORS = "\n\n" } NR == 1 { sub(/Suites:[^\n]*/, "Suites: " suite); print }' \
      "$sources" > "$work/sources/$suite.sources"
    apt=(apt-get -q -o APT::Sandbox::User=root -o Dir::Etc::sourcelist=/dev/null -o "Dir::Etc::sourceparts=$work/sources"
         -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o APT::Get::List-Cleanup=false)
    "${apt[@]}" update >/dev/null
    (cd "$work" && "${apt[@]}" download containerd >/dev/null)
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    dpkg -x "$work"/containerd_*.deb "$dir.tmp"
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
    rm -rf "$work"
    trap - EXIT
  fi
  echo "$dir/usr/bin"
done
