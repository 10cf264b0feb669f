#!/usr/bin/env bash
# The README's demo command and a part of the suite as a non-root user on a machine
# without the PostgreSQL server package: in a mount namespace of this script's own,
# /usr/lib/postgresql is hidden under an empty tmpfs, so pg_config and the Debian
# layout find nothing and the binaries can only come from pgserver (txmgr[embedded]).
# Usage: nonroot_embedded.sh DEMO_COMMAND   (needs root: it creates the user)
set -euo pipefail
demo_cmd="$1"
if [ "$(id -u)" != 0 ]; then
    echo "skipped: run as root to create the non-root user and hide the server package"
    exit 0
fi
user=txmgr-ci
id -u "$user" >/dev/null 2>&1 || useradd --create-home --user-group "$user"
home="$(getent passwd "$user" | cut -d: -f6)"
work="$home/checkout"
rm -rf "$work" && mkdir -p "$work"
# The checkout's files as they are (tracked and new, nothing ignored).
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$work"
chown -R "$user:$user" "$work"

# The user's own interpreter: root's may live where the user cannot read.
inner='set -euo pipefail
cd "$WORK"
python3 -m venv .venv
. .venv/bin/activate
echo "-- $(id -un), server binaries under /usr/lib/postgresql: $(ls /usr/lib/postgresql | wc -l)"
echo "-- $DEMO"
bash -euo pipefail -c "$DEMO"
python3 -m pip install -q -e ".[test,embedded]"
python3 -m pytest -p no:cacheprovider -q -o addopts="" --timeout=300 \
    tests/test_protocol.py tests/test_crash.py'
unshare --mount -- bash -c '
    mount -t tmpfs -o size=1m,mode=755 tmpfs /usr/lib/postgresql
    exec runuser -u "$0" -- env -i HOME="$1" USER="$0" PATH=/usr/local/bin:/usr/bin:/bin \
        LANG=C.UTF-8 CI="${CI:-}" WORK="$2" DEMO="$3" bash -c "$4"' \
    "$user" "$home" "$work" "$demo_cmd" "$inner"
