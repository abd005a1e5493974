#!/usr/bin/env bash
# Builds the CPU image from deploy/Dockerfile, from the repository root:
#
#   deploy/build-image.sh               # python:3.11-slim and torch's CPU index; offline if the base cannot be pulled
#   deploy/build-image.sh --offline     # no image registry (air-gapped hosts, these test machines)
#
# Offline, nothing comes from a registry at build time:
#   - the base image is Debian bookworm made here by debootstrap from Debian's packages (once, as
#     root; kept as paramhub-base:bookworm), imported with `docker import`;
#   - every wheel is fetched by the host's own pip, with the host's pip configuration, into a
#     wheelhouse (build/image/wheelhouse, kept), which the host serves on loopback while the build
#     installs from it alone (PIP_NO_INDEX, PIP_FIND_LINKS; the build runs on the host network).
#     torch is the CPU-only wheel OFFLINE_TORCH_PAIR names (the host's pip must be able to find it).
#
# Environment: TAG (paramhub:cpu), OFFLINE_TORCH_PAIR ("torch==2.13.0+cpu torchvision==0.28.0"),
# CACHE (build/image), PULL_TIMEOUT (60 s for the registry check), WHEELHOUSE_PORT (47391).
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${TAG:-paramhub:cpu}
OFFLINE_TORCH_PAIR=${OFFLINE_TORCH_PAIR:-"torch==2.13.0+cpu torchvision==0.28.0"}
CACHE=$(realpath -m "${CACHE:-build/image}")
BASE_TAG=paramhub-base:bookworm
PYTHON=${PYTHON:-python3}

say() { echo "build-image: $*" >&2; }

mode=auto
case "${1:-}" in
  --offline) mode=offline ;;
  "") ;;
  *) say "unknown argument $1 (use --offline or nothing)"; exit 2 ;;
esac

if [ "$mode" = auto ]; then
  if docker image inspect python:3.11-slim >/dev/null 2>&1 \
     || timeout "${PULL_TIMEOUT:-60}" docker pull -q python:3.11-slim >/dev/null 2>&1; then
    say "python:3.11-slim is available: building from it and torch's CPU index"
    exec docker build -f deploy/Dockerfile -t "$TAG" .
  fi
  say "python:3.11-slim cannot be pulled: building offline"
fi

base_image() {
  if docker image inspect "$BASE_TAG" >/dev/null 2>&1; then return; fi
  command -v debootstrap >/dev/null || { say "offline builds need debootstrap (apt-get install debootstrap)"; exit 1; }
  local rootfs="$CACHE/rootfs"
  say "making $BASE_TAG with debootstrap (a few minutes)"
  rm -rf "$rootfs" && mkdir -p "$rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" >&2
  # What no container reads: documentation, manuals, translations, package lists.
  rm -rf "$rootfs"/usr/share/{doc,man,info,locale}/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*
  tar -C "$rootfs" -c . | docker import -m "debootstrap --variant=minbase bookworm" - "$BASE_TAG" >/dev/null
  rm -rf "$rootfs" && mkdir -p "$rootfs"
}

wheelhouse() {
  local dir="$CACHE/wheelhouse" requirements
  mkdir -p "$dir"
  # paramhub's own dependencies and build backend, read from pyproject.toml
  requirements=$("$PYTHON" - <<'EOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))
print("\n".join(project["project"]["dependencies"] + project["build-system"]["requires"] + ["wheel"]))
EOF
)
  say "fetching wheels into $dir with the host's pip"
  # shellcheck disable=SC2086  # OFFLINE_TORCH_PAIR is a list of requirements
  "$PYTHON" -m pip download -q --only-binary :all: -d "$dir" $OFFLINE_TORCH_PAIR -r <(echo "$requirements") >&2
  echo "$dir"
}

base_image
dir=$(wheelhouse)
# The wheelhouse's address is a build argument, part of every layer's cache key: a fixed port keeps
# the torch layer cached from one build to the next (a free one is taken if it is busy).
port=$("$PYTHON" -c "
import socket
s = socket.socket()
try:
    s.bind(('127.0.0.1', ${WHEELHOUSE_PORT:-47391}))
except OSError:
    s.bind(('127.0.0.1', 0))
print(s.getsockname()[1])")
"$PYTHON" -m http.server --bind 127.0.0.1 --directory "$dir" "$port" >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  "$PYTHON" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/', timeout=1)" 2>/dev/null && break
  sleep 0.1
done

say "building $TAG on $BASE_TAG with $OFFLINE_TORCH_PAIR"
# The classic builder: it sees the imported base image and runs RUN steps on the host network.
DOCKER_BUILDKIT=0 docker build --network host -f deploy/Dockerfile -t "$TAG" \
  --build-arg BASE_IMAGE="$BASE_TAG" \
  --build-arg TORCH_PAIR="$OFFLINE_TORCH_PAIR" \
  --build-arg PIP_NO_INDEX=1 \
  --build-arg PIP_FIND_LINKS="http://127.0.0.1:$port/" \
  .
