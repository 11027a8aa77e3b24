#!/usr/bin/env bash
# A throwaway PostgreSQL server for the storage tests (search studies shared by workers).
#   .ci/postgres.sh start DIR   -> prints the URL to put in KILN_TEST_POSTGRES
#   .ci/postgres.sh stop DIR
# Uses the machine's PostgreSQL server binaries; installs Debian's package when they are missing.
set -euo pipefail
cmd=$1; dir=$2; port=${KILN_PG_PORT:-55432}
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
  apt-get install -y -q postgresql >/dev/null
fi
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
case $cmd in
  start)
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; chmod a+x "$(dirname "$dir")"; fi
    as_pg "$bin/initdb" -D "$dir/data" -A trust -U kiln >/dev/null
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1" start >/dev/null
    as_pg "$bin/createdb" -h 127.0.0.1 -p "$port" -U kiln kiln
    echo "postgresql://kiln@127.0.0.1:$port/kiln"
    ;;
  stop)
    as_pg "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null || true
    ;;
esac
