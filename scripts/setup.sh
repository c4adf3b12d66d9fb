#!/usr/bin/env bash
# Install what addlower and its tests need on a Debian machine, as root: containerd, runc, a static
# busybox and a registry (docker-registry) from Debian, the containerd of Debian's trixie (1.7) and
# sid (2.x) unpacked beside it for the e2e matrix (scripts/containerd-versions.sh), then this
# project (editable) with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
if ! command -v containerd >/dev/null || ! command -v runc >/dev/null || ! command -v docker-registry >/dev/null \
  || ! dpkg -s busybox-static >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq containerd runc busybox-static docker-registry >/dev/null
fi
scripts/containerd-versions.sh >/dev/null
# A distribution's own python3 (PEP 668) refuses pip installs unless told this is wanted.
python3 -m pip install -q --disable-pip-version-check -e '.[test]' 2>/dev/null \
  || python3 -m pip install -q --disable-pip-version-check --break-system-packages -e '.[test]'
