#!/usr/bin/env bash
# Installs what amesh needs on a Debian 12 machine, idempotently: Debian packages, kernel
# headers BCC can compile against, and a virtual environment .venv that imports bcc.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
for pkg in python3-bpfcc python3-venv iproute2 "$@"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need_pkgs+=("$pkg")
done
# BCC needs headers for the running kernel; where the distribution has none, Debian's
# newest headers serve, because amesh's programs use only the stable uapi headers.
modules="/lib/modules/$(uname -r)"
if [ ! -e "$modules/build" ]; then
  dpkg-query -W -f='${Status}' linux-headers-amd64 2>/dev/null | grep -q 'install ok installed' || need_pkgs+=(linux-headers-amd64)
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need_pkgs[*]}"
  apt-get update -qq
  # Tools only: packages such as prometheus ship a service that Debian would start at once.
  # policy-rc.d (when none is there already) keeps every service stopped during the install.
  guard=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    guard=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' > "$guard"
    chmod 755 "$guard"
  fi
  trap '[ -n "$guard" ] && rm -f "$guard"' EXIT
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  [ -n "$guard" ] && rm -f "$guard"
  guard=""
fi
if [ ! -e "$modules/build" ]; then
  build=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n 1)
  common=${build%-amd64}-common
  echo "linking kernel headers $build for $(uname -r)"
  mkdir -p "$modules"
  ln -sfn "$build" "$modules/build"
  ln -sfn "$common" "$modules/source"
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# Debian ships bcc for its own python3 only; its module is pure Python over libbcc, so the
# venv takes that one package from dist-packages rather than every Debian Python package.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn /usr/lib/python3/dist-packages/bcc "$site/bcc"
stamp=.venv/.installed
if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test,bench]'
  touch "$stamp"
fi
.venv/bin/python -c 'import bcc, pyroute2'
