#!/usr/bin/env bash
# `make image`: builds the amesh image without a Docker daemon and without any image registry.
#  1. a Debian 12 root filesystem from Debian's packages (debootstrap, minbase), cached as
#     build/image/rootfs.tar (delete it to make a fresh one);
#  2. that tree as the base image localhost/amesh-base:bookworm (buildah from scratch);
#  3. the Containerfile on that base (buildah bud, chroot isolation: no daemon, no runtime);
#  4. the OCI archive build/amesh-$VERSION.oci.tar, which `podman load -i` and `ctr import` take,
#     as docker.io/library/amesh:$VERSION.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
image="localhost/amesh:$version"
base=localhost/amesh-base:bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=build/image
archive="build/amesh-$version.oci.tar"

need=()
for tool in buildah debootstrap podman runc; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

mkdir -p "$cache"
if [ ! -s "$cache/rootfs.tar" ]; then
  echo "debootstrap: a Debian 12 root filesystem from $mirror"
  rm -rf "$cache/rootfs"
  debootstrap --variant=minbase bookworm "$cache/rootfs" "$mirror" > "$cache/debootstrap.log"
  # debootstrap names bookworm only: the image's packages come with Debian's updates and fixes
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s-security bookworm-security main\n' \
    "$mirror" "$mirror" "$mirror" > "$cache/rootfs/etc/apt/sources.list"
  rm -rf "$cache"/rootfs/var/cache/apt/archives/*.deb "$cache"/rootfs/var/lib/apt/lists/*
  tar -C "$cache/rootfs" --numeric-owner -cf "$cache/rootfs.tar.tmp" .
  mv "$cache/rootfs.tar.tmp" "$cache/rootfs.tar"
  rm -rf "$cache/rootfs"
fi
# the base image is remade when the cached tree is newer than it
stamp="$cache/base.stamp"
if ! buildah inspect --type image "$base" >/dev/null 2>&1 || [ "$cache/rootfs.tar" -nt "$stamp" ]; then
  echo "base image $base from $cache/rootfs.tar"
  ctr=$(buildah from scratch)
  trap 'buildah rm "$ctr" >/dev/null' EXIT
  buildah add "$ctr" "$cache/rootfs.tar" / >/dev/null
  buildah config --cmd /bin/bash --label org.opencontainers.image.description="Debian 12 (debootstrap minbase)" "$ctr"
  buildah commit -q --rm "$ctr" "$base" >/dev/null
  trap - EXIT
  touch "$stamp"
fi
echo "buildah bud: $image"
# the build machine's CA bundle, mounted for the RUN steps only (not in the image): pip reaches
# the package index with the trust this machine has, a TLS-inspecting proxy's CA included
host_ca=/etc/ssl/certs/ca-certificates.crt
buildah bud --isolation chroot --network host --layers --force-rm --build-arg "BASE=$base" \
  --volume "$host_ca:/run/build-ca.crt:ro" --build-arg PIP_CERT=/run/build-ca.crt -t "$image" -f Containerfile .
rm -f "$archive"
# named as a kubelet resolves the manifests' `image: amesh:VERSION` (containerd and CRI-O expand a
# short name to docker.io/library/...), so an imported archive is found without a pull
buildah push -q "$image" "oci-archive:$archive:docker.io/library/amesh:$version"
echo "image $image: $archive ($(du -h "$archive" | cut -f1))"
