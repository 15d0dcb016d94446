#!/usr/bin/env bash
# Build (once) an arm64 Debian trixie rootfs for `make test-arm`, from Debian's packages with debootstrap, and
# run its second stage under qemu-user through proot (no binfmt_misc registration, no root inside needed).
# Cached in $ARM_ROOTFS (default <repo>/.cache/arm-rootfs); a finished rootfs has .pbs2p-rootfs-ready.
# Idempotent: exits at once when the cache is there. Host tools (debootstrap, proot, qemu-user-static) are
# apt-installed when missing and we are root.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${ARM_ROOTFS:-$repo/.cache/arm-rootfs}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
marker="$root/.pbs2p-rootfs-ready"
# What a Raspberry Pi OS user installs (docs/DEPLOY.md): a C++ toolchain, cmake, Python, ORT headers.
packages="python3,python3-venv,g++,make,cmake,ca-certificates,libonnxruntime-dev"
[[ -f "$marker" ]] && exit 0

missing=()
command -v debootstrap >/dev/null 2>&1 || [[ -x /usr/sbin/debootstrap ]] || missing+=(debootstrap)
command -v proot >/dev/null 2>&1 || missing+=(proot)
command -v qemu-aarch64-static >/dev/null 2>&1 || missing+=(qemu-user-static)
if [[ ${#missing[@]} -gt 0 ]]; then
  if [[ "$(id -u)" -ne 0 ]]; then
    echo "error: missing host tools: ${missing[*]} (apt-get install ${missing[*]} as root)" >&2
    exit 2
  fi
  echo "installing host tools: ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [[ "$(id -u)" -ne 0 ]]; then
  echo "error: debootstrap's first stage needs root (run make test-arm as root, or with sudo)" >&2
  exit 2
fi

partial="$root.partial"
mkdir -p "$(dirname "$root")"
start=$SECONDS
# Stage 1 is kept when it finished (its debootstrap/ folder is there) and stage 2 failed or was interrupted.
if [[ ! -x "$partial/debootstrap/debootstrap" ]]; then
  rm -rf "$partial"
  echo "arm rootfs: debootstrap stage 1 (download + unpack, trixie arm64) into $partial" >&2
  /usr/sbin/debootstrap --arch=arm64 --foreign --variant=minbase --include="$packages" trixie "$partial" \
    "$mirror" >"$root.log" 2>&1 || { tail -n 30 "$root.log" >&2; exit 1; }
fi
echo "arm rootfs: debootstrap stage 2 under qemu-aarch64 (configure packages; slow)" >&2
# Stage 1 leaves /proc as a symlink to the host's /proc; proot binds the real one on a directory.
[[ -L "$partial/proc" ]] && rm "$partial/proc" && mkdir "$partial/proc"
proot -q qemu-aarch64-static -0 -r "$partial" -b /dev -b /proc -b /sys -w / /usr/bin/env -i \
  PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root DEBOOTSTRAP_DIR=/debootstrap \
  /debootstrap/debootstrap --second-stage >>"$root.log" 2>&1 || { tail -n 30 "$root.log" >&2; exit 1; }
# DNS and the host's CA bundle (pip's TLS, if the host trusts a local CA), for pip inside the rootfs.
cp /etc/resolv.conf "$partial/etc/resolv.conf"
cp /etc/ssl/certs/ca-certificates.crt "$partial/etc/ssl/certs/host-ca-certificates.crt"
echo "arm rootfs: python venv with the runtime's wheels (onnxruntime, numpy, tokenizers) for aarch64" >&2
proot -q qemu-aarch64-static -0 -r "$partial" -b /dev -b /proc -b /sys -w / /usr/bin/env -i \
  PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt \
  PIP_DISABLE_PIP_VERSION_CHECK=1 /bin/sh -c \
  "python3 -m venv /opt/pbs2p && /opt/pbs2p/bin/pip install -q \
   'onnxruntime${ORT_VERSION:+==$ORT_VERSION}' numpy tokenizers click tqdm psutil 'scikit-build-core>=0.10'" \
  >>"$root.log" 2>&1 || { tail -n 30 "$root.log" >&2; exit 1; }
date -u +%FT%TZ >"$partial/.pbs2p-rootfs-ready"
rm -rf "$root"
mv "$partial" "$root"
echo "arm rootfs ready in $root ($((SECONDS - start)) s; log $root.log)" >&2
