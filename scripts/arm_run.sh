#!/usr/bin/env bash
# Run a command inside the arm64 rootfs of `make test-arm`: chroot + qemu-user through binfmt_misc (the
# qemu-aarch64 entry of qemu-user-static is registered here if it is not, with its F flag, so the chroot needs
# no qemu binary inside), in a private mount namespace (its /proc, /dev, /sys and the bundles directory are
# mounted for this command only and vanish with it). A Raspberry Pi 4 /proc/cpuinfo is bound over the
# host's x86 one: onnxruntime's CPU detection crashes at import on an x86 cpuinfo under qemu-user.
# (proot -q was tried first: it could not see some directories of the rootfs, e.g. /usr/share/cmake-3.31.)
#     scripts/arm_run.sh ROOTFS BUNDLES_DIR [VAR=VALUE...] COMMAND [ARGS...]   (as root; cwd /src if present)
set -euo pipefail
root="$1" bundles="$2"
shift 2
if [[ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]]; then
  mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  update-binfmts --enable qemu-aarch64 >/dev/null
fi
exec unshare -m --propagation private /bin/bash -c '
  set -e
  r="$1" b="$2"
  shift 2
  mount -t proc proc "$r/proc"
  mount --bind "$r/etc/pbs2p-cpuinfo" "$r/proc/cpuinfo"
  mount --rbind /dev "$r/dev"
  mount --rbind /sys "$r/sys"
  mkdir -p "$r/bundles"
  mount --bind "$b" "$r/bundles"
  exec chroot "$r" /usr/bin/env -i PATH=/opt/pbs2p/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt \
    /bin/sh -c "cd /src 2>/dev/null || cd /; exec env \"\$@\"" sh "$@"
' arm-run "$root" "$bundles" "$@"
