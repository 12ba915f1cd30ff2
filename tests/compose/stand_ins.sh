#!/usr/bin/env bash
# Builds, once, the two base images the project's Dockerfile and docker-compose.yml name,
# where no registry of images can be reached: stand-ins made with debootstrap from Debian's
# packages and tagged with the official names, so those files run exactly as users run them.
#   python:3.11-slim  Debian bookworm's python3 (3.11) with pip, `python` and `pip` on PATH
#   postgres:16       Debian bookworm's PostgreSQL (15) behind an entrypoint that honours the
#                     official image's POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB contract
# Needs root, podman and debootstrap. The root file systems are cached in $ROOTFS_CACHE.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"
cache="${ROOTFS_CACHE:-/var/tmp/tauopt-rootfs}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
mkdir -p "$cache"

bootstrap() {  # bootstrap NAME PACKAGES: a minbase bookworm root file system in $cache/NAME
    local dir="$cache/$1"
    if [ ! -f "$dir/.complete" ]; then
        rm -rf "$dir"
        debootstrap --variant=minbase --include="$2" bookworm "$dir" "$mirror" >"$cache/$1.log"
        # The host's CA bundle: pip in the image must trust what this machine's pip trusts.
        cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/ca-certificates.crt"
        rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
        touch "$dir/.complete"
    fi
}

if ! podman image exists python:3.11-slim; then
    bootstrap python python3,python3-venv,python3-pip,ca-certificates
    dir="$cache/python"
    # As in the official image: pip installs into the system Python, `python` is python3.
    rm -f "$dir"/usr/lib/python3*/EXTERNALLY-MANAGED
    ln -sf python3 "$dir/usr/bin/python"
    tar -C "$dir" --exclude=./.complete -c . | podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - python:3.11-slim >/dev/null
    echo "built stand-in python:3.11-slim"
fi

# Rebuilt when this script or the entrypoint changes: the image carries their digest.
digest=$(cat "$0" "$here/postgres-entrypoint.sh" | sha256sum | cut -c1-16)
label=$(podman image inspect postgres:16 --format '{{index .Config.Labels "tauopt.stand-in"}}' \
    2>/dev/null || true)
if [ "$label" != "$digest" ]; then
    bootstrap postgres postgresql,util-linux
    dir="$cache/postgres"
    # As the official image: `docker stop` sends SIGINT, PostgreSQL's fast shutdown. SIGTERM
    # is its smart shutdown, which waits for every client (a dashboard's idle connections)
    # until the runtime's SIGKILL, and the next start must then recover from a crash.
    install -m 755 "$here/postgres-entrypoint.sh" "$dir/usr/local/bin/docker-entrypoint.sh"
    # Debian's package made a cluster at install time; the entrypoint makes its own in PGDATA.
    rm -rf "$dir"/var/lib/postgresql/* "$dir"/etc/postgresql/*
    tar -C "$dir" --exclude=./.complete -c . | podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV PGDATA=/var/lib/postgresql/data' \
        --change 'ENTRYPOINT ["docker-entrypoint.sh"]' --change 'EXPOSE 5432' \
        --change 'STOPSIGNAL SIGINT' --change "LABEL tauopt.stand-in=$digest" \
        - postgres:16 >/dev/null
    echo "built stand-in postgres:16"
fi
