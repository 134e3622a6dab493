#!/usr/bin/env bash
# Build the CPU image (Dockerfile, target "cpu") and run the tiny experiment inside it, shrunk to
# a few steps per stage, through the local executor. No container registry is needed: the base
# is Debian bookworm made by debootstrap from Debian's package archive, and buildah builds and
# runs with chroot isolation and the vfs driver (no daemon, no overlay, no user namespaces).
# Root, Debian/Ubuntu. CI runs it after the tests; prints the time of each part.
#
#   bash hpc/image-check.sh [WORK_DIR]     (default /tmp/dpo-hpc-image)
#
# pip inside the build uses this machine's settings when they exist: PIP_INDEX_URL, the CA bundle
# of PIP_CERT (for a proxy that re-signs TLS) and PIP_FIND_LINKS (a folder of wheels, mounted).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/dpo-hpc-image}
BUILDAH=(buildah --storage-driver vfs)
export DEBIAN_FRONTEND=noninteractive
if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends buildah debootstrap >/dev/null
fi
mkdir -p "$WORK"
# vfs keeps whole copies: the build and the run peak at about 6 GB above what the images hold.
NEED_GB=8
for dir in /var/lib /var/tmp; do
  free_gb=$(( $(df -Pk "$dir" | awk 'NR == 2 {print $4}') / 1048576 ))
  if [ "$free_gb" -lt "$NEED_GB" ]; then
    echo "[image] $dir has $free_gb GB free; the build needs about $NEED_GB GB (free space, or remove old images:" \
         "buildah --storage-driver vfs images)" >&2
    exit 1
  fi
done
step() { echo "[image] $1 ($(( SECONDS - START )) s so far)"; }
START=$SECONDS

BASE=localhost/dpo-hpc-base:bookworm
if ! "${BUILDAH[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs" \
    http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; exit 1; }
  tar -C "$WORK/rootfs" -cf "$WORK/rootfs.tar" .
  ctr=$("${BUILDAH[@]}" from scratch)
  "${BUILDAH[@]}" add "$ctr" "$WORK/rootfs.tar" / >/dev/null
  "${BUILDAH[@]}" commit -q "$ctr" "$BASE" >/dev/null
  "${BUILDAH[@]}" rm "$ctr" >/dev/null
  rm -rf "$WORK/rootfs" "$WORK/rootfs.tar"
fi
step "base $BASE ready (debootstrap)"

args=(--isolation chroot --target cpu --build-arg "CPU_BASE=$BASE" -t localhost/dpo-hpc:cpu)
[ -n "${PIP_INDEX_URL:-}" ] && args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
  args+=(-v "$PIP_CERT:/etc/ssl/certs/build-ca.crt:ro" --build-arg PIP_CERT=/etc/ssl/certs/build-ca.crt)
fi
if [ -n "${PIP_FIND_LINKS:-}" ] && [ -d "$PIP_FIND_LINKS" ]; then
  args+=(-v "$PIP_FIND_LINKS:/opt/find-links:ro" --build-arg PIP_FIND_LINKS=/opt/find-links)
fi
previous=$("${BUILDAH[@]}" images -q localhost/dpo-hpc:cpu 2>/dev/null || true)
"${BUILDAH[@]}" bud "${args[@]}" "$REPO" >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }
# The tag moved to the new image: drop the one an earlier check built, or every check leaves 2 GB behind.
built=$("${BUILDAH[@]}" images -q localhost/dpo-hpc:cpu)
if [ -n "$previous" ] && [ "$previous" != "$built" ]; then
  "${BUILDAH[@]}" rmi "$previous" >/dev/null 2>&1 || echo "[image] kept the previous image $previous (a container uses it)"
fi
step "image localhost/dpo-hpc:cpu built ($("${BUILDAH[@]}" images --format '{{.Size}}' localhost/dpo-hpc:cpu))"

rm -rf "$WORK/run" && mkdir -p "$WORK/run" && cp -r "$REPO/experiments" "$WORK/run/"
ctr=$("${BUILDAH[@]}" from localhost/dpo-hpc:cpu)
trap '"${BUILDAH[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
"${BUILDAH[@]}" run --isolation chroot -v "$WORK/run:/work" --workingdir /work "$ctr" -- \
  python -m dpo_hpc.submit experiments/tiny.toml --local --set sft_training.max_steps=10 --set dpo_training.max_steps=5 \
  | tee "$WORK/run.log" | grep -E '^\[submit\] .*(done|failed)'
grep -q '5 of 5 run(s) done' "$WORK/run.log"
step "the tiny experiment ran inside the image: 5 of 5 runs done"
