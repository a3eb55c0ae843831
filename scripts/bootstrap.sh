#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian/Ubuntu machine:
# Debian packages (QEMU, image-build tools), a virtualenv with the package,
# and the default guest images (built from Debian packages, cached).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86 qemu-utils e2fsprogs iproute2 ca-certificates
  curl  # egress tests drive the proxy with curl
  socat  # networked sandboxes: one connector per guest connection (QEMU guestfwd cmd:)
  python3 python3-venv
  # host-side unit tests of the guest's JavaScript REPL driver
  nodejs
  # kernel build from Debian's linux-source
  linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# packages=: JavaScript packages are resolved and fetched with the host's npm. Some nodejs builds
# (NodeSource's) carry npm themselves and conflict with Debian's npm package: ask for it only when
# no npm command exists.
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -e '.[dev]'

# Build (or verify the cache of) the default guest images.
.venv/bin/sbx images build
