#!/usr/bin/env bash
# Fetch ONNX Runtime C/C++ API headers (Debian trixie's libonnxruntime-dev .deb) into <repo>/.cache/onnxruntime-dev.
# Idempotent and quiet when the cache already exists. Needs only apt-get + dpkg-deb (no root: a private apt
# state dir is used, the system's sources and lists are not touched).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${ORT_HEADERS_CACHE:-$repo/.cache/onnxruntime-dev}"
marker="$dest/usr/include/onnxruntime/onnxruntime_cxx_api.h"
[[ -f "$marker" ]] && exit 0

mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
keyring="/usr/share/keyrings/debian-archive-keyring.gpg"
[[ -f "$keyring" ]] || { echo "error: $keyring missing (apt-get install debian-archive-keyring)" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/sources" "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/deb"
cat >"$tmp/sources/trixie.sources" <<SRC
Types: deb
URIs: $mirror
Suites: trixie
Components: main
Signed-By: $keyring
SRC

apt_opts=(-q -oDir::Etc::SourceList=/dev/null "-oDir::Etc::SourceParts=$tmp/sources"
  "-oDir::State::Lists=$tmp/lists" "-oDir::Cache=$tmp/cache" -oDir::Cache::pkgcache= -oDir::Cache::srcpkgcache=
  -oAPT::Sandbox::User=root -oDebug::NoLocking=1)
echo "fetching libonnxruntime-dev headers from Debian trixie ($mirror)" >&2
apt-get "${apt_opts[@]}" update >"$tmp/update.log" 2>&1 || { cat "$tmp/update.log" >&2; exit 1; }
(cd "$tmp/deb" && apt-get "${apt_opts[@]}" download libonnxruntime-dev >"$tmp/download.log" 2>&1) \
  || { cat "$tmp/download.log" >&2; exit 1; }
deb="$(ls "$tmp"/deb/libonnxruntime-dev_*.deb)"
mkdir -p "$tmp/x"
dpkg-deb -x "$deb" "$tmp/x"
[[ -f "$tmp/x/usr/include/onnxruntime/onnxruntime_cxx_api.h" ]] || { echo "error: $deb has no headers" >&2; exit 1; }
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.partial"
mv "$tmp/x" "$dest.partial"
basename "$deb" >"$dest.partial/SOURCE_DEB"
mv "$dest.partial" "$dest"
echo "ORT headers in $dest/usr/include/onnxruntime ($(basename "$deb"))" >&2
