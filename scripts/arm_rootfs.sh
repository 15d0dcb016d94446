#!/usr/bin/env bash
# Build (once) an arm64 Debian trixie rootfs for `make test-arm`, from Debian's packages, cached in $ARM_ROOTFS
# (default <repo>/.cache/arm-rootfs; a finished one has .pbs2p-rootfs-ready). Runs its programs under
# qemu-user: chroot through binfmt_misc (scripts/arm_run.sh), as root.
#
# How: `debootstrap --foreign` resolves and downloads trixie arm64 (minbase + a C++ toolchain, cmake, Python,
# libonnxruntime-dev: what a Raspberry Pi OS user installs, docs/DEPLOY.md), then every package is unpacked
# with the host's dpkg-deb. debootstrap's second stage (maintainer scripts under emulation) is skipped: on a
# shared 2-core machine it took over 30 minutes; the tools used here need none of those scripts (ldconfig is
# run once, the CA bundle is the host's). The runtime's wheels (onnxruntime, numpy, tokenizers, ... for
# manylinux aarch64, CPython 3.13) are installed into /opt/pbs2p by the host's pip, natively, from PyPI.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
root="${ARM_ROOTFS:-$repo/.cache/arm-rootfs}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
marker="$root/.pbs2p-rootfs-ready"
packages="python3,python3-venv,g++,make,cmake,ca-certificates,libonnxruntime-dev"
pip_host="${PIP_HOST:-$repo/.venv/bin/pip}"
[[ -f "$marker" ]] && exit 0

missing=()
[[ -x /usr/sbin/debootstrap ]] || missing+=(debootstrap)
command -v update-binfmts >/dev/null 2>&1 || missing+=(binfmt-support)
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
  echo "error: debootstrap and chroot need root (run make test-arm as root, or with sudo)" >&2
  exit 2
fi

partial="$root.partial"
log="$root.log"
mkdir -p "$(dirname "$root")"
start=$SECONDS
if [[ ! -x "$partial/debootstrap/debootstrap" ]]; then  # a finished download is reused after a failure
  rm -rf "$partial"
  echo "arm rootfs: debootstrap --foreign (resolve + download trixie arm64) into $partial" >&2
  /usr/sbin/debootstrap --arch=arm64 --foreign --variant=minbase --include="$packages" trixie "$partial" \
    "$mirror" >"$log" 2>&1 || { tail -n 30 "$log" >&2; exit 1; }
fi
echo "arm rootfs: unpack $(ls "$partial"/var/cache/apt/archives/*.deb | wc -l) packages with dpkg-deb" >&2
for deb in "$partial"/var/cache/apt/archives/*.deb; do
  dpkg-deb -x "$deb" "$partial"
done
[[ -L "$partial/proc" ]] && rm "$partial/proc" && mkdir -p "$partial/proc"  # debootstrap links the host's
cp /etc/resolv.conf "$partial/etc/resolv.conf"
cp /etc/ssl/certs/ca-certificates.crt "$partial/etc/ssl/certs/ca-certificates.crt"
cp /etc/ssl/certs/ca-certificates.crt "$partial/etc/ssl/certs/host-ca-certificates.crt"
# A Raspberry Pi 4's /proc/cpuinfo (4 x Cortex-A72), bound over the host's x86 one: onnxruntime's CPU
# detection parses it and crashes (SIGSEGV at import) on an x86 cpuinfo under qemu-user.
for i in 0 1 2 3; do
  printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n' "$i"
  printf 'CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n'
done >"$partial/etc/pbs2p-cpuinfo"
run() { bash "$repo/scripts/arm_run.sh" "$partial" "$partial/tmp" "$@"; }
echo "arm rootfs: ldconfig, python venv (under qemu)" >&2
run /sbin/ldconfig >>"$log" 2>&1
run /usr/bin/python3 -m venv --without-pip /opt/pbs2p >>"$log" 2>&1
pyver="$(run /usr/bin/python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
site="$partial/opt/pbs2p/lib/python$pyver/site-packages"
echo "arm rootfs: aarch64 wheels for CPython $pyver into /opt/pbs2p (host pip)" >&2
"$pip_host" install -q --no-compile --target "$site" --platform manylinux_2_28_aarch64 \
  --platform manylinux2014_aarch64 --python-version "$pyver" --implementation cp --only-binary=:all: \
  "onnxruntime${ORT_VERSION:+==$ORT_VERSION}" numpy tokenizers click tqdm psutil pip \
  "scikit-build-core>=0.10" >>"$log" 2>&1 || { tail -n 30 "$log" >&2; exit 1; }
# A guest killed by a signal may still leave exit status 0 through qemu: check the output instead.
check="$(run /opt/pbs2p/bin/python -c 'import onnxruntime, numpy, tokenizers; print("ort", onnxruntime.__version__)' 2>&1)"
echo "$check" >>"$log"
[[ "$check" == *"ort "* ]] || { echo "error: onnxruntime does not import in the rootfs: $check" >&2; exit 1; }
date -u +%FT%TZ >"$partial/.pbs2p-rootfs-ready"
rm -rf "$root"
mv "$partial" "$root"
echo "arm rootfs ready in $root ($((SECONDS - start)) s; log $log)" >&2
