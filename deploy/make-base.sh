#!/usr/bin/env bash
# Make the base image local/bookworm-python:1 (Debian bookworm, Python 3.11) by debootstrap, for
# machines that reach Debian's package mirror but no container registry. Real deployments keep the
# official bases (python:3.11-slim, the CUDA base): pass this one as the BASE build argument only here.
#
#   sudo deploy/make-base.sh [IMAGE] [WORKDIR]      (root: debootstrap and rootful podman)
#
# Uses the podman of the caller's environment (CONTAINERS_CONF / CONTAINERS_STORAGE_CONF, as
# deploy/e2e.sh sets them). Does nothing if IMAGE already exists.
set -euo pipefail

IMAGE=${1:-local/bookworm-python:1}
WORK=${2:-$(mktemp -d)}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

fail() { echo "make-base: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "run as root (debootstrap and rootful podman need it)"
for tool in debootstrap podman tar; do
    command -v "$tool" >/dev/null || fail "$tool not found (Debian: apt-get install debootstrap podman)"
done
if podman image exists "$IMAGE"; then
    echo "make-base: $IMAGE exists"
    exit 0
fi

mkdir -p "$WORK"
rootfs=$WORK/rootfs
cleanup() {  # debootstrap mounts proc/sys in the target: unmount before removing anything
    grep -o " $rootfs/[^ ]*" /proc/mounts | sort -r | xargs -r umount -l 2>/dev/null || true
    rm -rf --one-file-system "$rootfs" "$WORK/rootfs.tar"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
cleanup
start=$(date +%s)
# python3-venv: the images install leukfed into a venv, so Debian's EXTERNALLY-MANAGED never applies.
if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
    fail "debootstrap failed (see $WORK/debootstrap.log: $(tail -n 1 "$WORK/debootstrap.log"))"
fi
# Keep the image small: no apt lists, caches, docs or man pages.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
       "$rootfs"/usr/share/locale/* "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/log/*.log
tar -C "$rootfs" --numeric-owner -cf "$WORK/rootfs.tar" .
podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    "$WORK/rootfs.tar" "$IMAGE" >/dev/null
echo "make-base: $IMAGE made in $(( $(date +%s) - start )) s ($(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
