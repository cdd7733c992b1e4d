#!/usr/bin/env bash
# Builds the proxy and control-plane images from deploy/Dockerfile with no image registry (as CI must): the proxy on a
# Debian base made with debootstrap from Debian's packages (iptables and iproute2 included), the control plane on
# `scratch`, both with the static binaries deploy/build-static.sh built (BIN, default
# ${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/release), stripped into target/image-bin. Needs a running
# Docker engine and debootstrap; tags ferry/proxy:$TAG and ferry/control:$TAG (TAG default `ci`; IMAGES="proxy" builds
# only the proxy's, e.g. from dynamically linked debug binaries, which the scratch control image could not run), then
# runs each image's binaries once.
# `build-images.sh base` makes only the base (ferry/debian-base:bookworm), which is kept and reused.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/release}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
TAG="${TAG:-ci}"
IMAGES="${IMAGES:-proxy control}"
# Debian's docker.io client (20.10) builds with the engine's own BuildKit; a newer client elsewhere on PATH would want
# the buildx plugin.
DOCKER="${DOCKER:-$([ -x /usr/bin/docker ] && echo /usr/bin/docker || echo docker)}"
docker() { "$DOCKER" "$@"; }
BASE=ferry/debian-base:bookworm
# One build at a time (CI's background base build and a test's proxy image share the base and target/image-bin).
exec 9>"${TMPDIR:-/tmp}/ferry-build-images.lock"
flock 9
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  rootfs=$(mktemp -d)
  if ! debootstrap --variant=minbase --include=iptables,iproute2 bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1; then
    tail -n 30 "$rootfs.log" >&2
    echo "debootstrap of the proxy's base failed (mirror $MIRROR)" >&2
    exit 1
  fi
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs.log"
  tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
  rm -rf "$rootfs"
fi
# `build-images.sh base`: only the base image (CI makes it while the tests are compiled).
[ "${1:-}" = base ] && exit 0
mkdir -p target/image-bin
for bin in ferry ferry-control ferryctl; do
  strip -o "target/image-bin/$bin" "$BIN/$bin"
done
args=(--build-arg BINARIES=prebuilt --build-arg PREBUILT=target/image-bin --build-arg "PROXY_BASE=$BASE"
      --build-arg PROXY_PACKAGES= --build-arg CONTROL_BASE=scratch)
export DOCKER_BUILDKIT=1
for image in $IMAGES; do
  docker build -q -f deploy/Dockerfile --target "$image" -t "ferry/$image:$TAG" "${args[@]}" . >/dev/null
  echo "$(docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "ferry/$image:$TAG")"
done
# Each image runs what it carries: the proxy (as UID 1337) and its iptables and ip, the control plane and the CLI.
case " $IMAGES " in *" proxy "*)
  docker run --rm --network none "ferry/proxy:$TAG" --version
  docker run --rm --network none --entrypoint iptables "ferry/proxy:$TAG" --version
  docker run --rm --network none --entrypoint ip "ferry/proxy:$TAG" -V
esac
case " $IMAGES " in *" control "*)
  docker run --rm --network none "ferry/control:$TAG" --version
  docker run --rm --network none --entrypoint /usr/local/bin/ferryctl "ferry/control:$TAG" --version
esac
