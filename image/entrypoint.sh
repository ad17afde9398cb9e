#!/bin/sh
# The image's entrypoint: gives BCC kernel headers for the node's kernel, then runs the command.
# A node's own headers win when /lib/modules/$(uname -r)/build exists (a hostPath mount); else the
# links point at the Debian headers in the image (amesh's programs need only the uapi ones). The
# links are made in the container's own /lib/modules: the node is left as it was.
set -eu
modules="/lib/modules/$(uname -r)"
if [ ! -e "$modules/build" ]; then
  mkdir -p "$modules"
  ln -sfn /usr/src/amesh-headers "$modules/build"
  ln -sfn /usr/src/amesh-headers-common "$modules/source"
fi
exec "$@"
