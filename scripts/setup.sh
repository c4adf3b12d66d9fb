#!/usr/bin/env bash
# Install what addlower and its tests need on a Debian machine, as root: containerd, runc, a static
# busybox, a registry (docker-registry), systemd (systemd-analyze checks the unit) and e2fsprogs (a
# full filesystem is a small loop-mounted ext4) from Debian,
# the containerd of Debian's trixie (1.7) and sid (2.x) unpacked beside it for the e2e matrix
# (scripts/containerd-versions.sh), the Go original built from ../shared/peers (tests take over its
# root), then this project (editable) with its test extras. Idempotent.
#
# It installs into $PYTHON (default: the python3 first on PATH) and says which; it stops if that is
# not the python3 the README's commands run or if the `addlower` on PATH would be another
# installation's: PYTHON=/path/to/python3 scripts/setup.sh picks another.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
target=$("$python" -c 'import sys; print(sys.executable)') || { echo "setup.sh: cannot run $python" >&2; exit 1; }
scripts=$("$python" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
first=$(command -v python3 || true)
if [ -n "$first" ] && [ "$(python3 -c 'import sys; print(sys.executable)')" != "$target" ]; then
  echo "setup.sh: $python is $target, but python3 on PATH is $first: the README's commands would not see" \
       "what is installed; put $target first on PATH or run with PYTHON=$first" >&2
  exit 1
fi
echo "setup.sh: installing addlower into $target (commands in $scripts)"
export DEBIAN_FRONTEND=noninteractive
if ! command -v containerd >/dev/null || ! command -v runc >/dev/null || ! command -v docker-registry >/dev/null \
  || ! command -v systemd-analyze >/dev/null || ! command -v mkfs.ext4 >/dev/null || ! dpkg -s busybox-static >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq containerd runc busybox-static docker-registry systemd e2fsprogs >/dev/null
fi
scripts/containerd-versions.sh >/dev/null
# The Go original, which tests take a root over from (built offline with Debian's Go packages).
go_original=/tmp/peers-bin/overlay-custom-add-lower-snapshotter
[ -x "$go_original" ] || bash ../shared/peers/seedsnap/build.sh "" "$go_original" >/dev/null
# A distribution's own python3 (PEP 668) refuses pip installs unless told this is wanted.
"$python" -m pip install -q --disable-pip-version-check -e '.[test]' 2>/dev/null \
  || "$python" -m pip install -q --disable-pip-version-check --break-system-packages -e '.[test]'
found=$(command -v addlower || true)
case "$found" in */.pyenv/shims/*) found=$(pyenv which addlower 2>/dev/null || true) ;; esac  # a shim dispatches
if [ "$found" != "$scripts/addlower" ]; then
  echo "setup.sh: warning: addlower on PATH is ${found:-missing}, not $scripts/addlower: add $scripts to PATH" >&2
fi
