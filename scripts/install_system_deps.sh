#!/usr/bin/env bash
# System packages the kernel tests need: the aarch64 cross compiler and qemu-user (NEON path under emulation).
set -euo pipefail
missing=()
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || missing+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null 2>&1 || missing+=(qemu-user)
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
  echo "error: missing system packages: ${missing[*]} (install them with apt as root)" >&2
  exit 2
fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
echo "installing system packages: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
