# Shared by scripts/run and scripts/test: a virtualenv with the project installed, and local
# PostgreSQL and Redis started if they are installed here but not running.

require_python() {
    PYTHON=${PYTHON:-python3}
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "smsgate needs Python 3.11 or newer as \$PYTHON or python3" >&2
        exit 1
    fi
}

# Installs into .venv; reinstalls only when pyproject.toml changed since the last install.
ensure_venv() {
    local extras=$1
    require_python
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    local stamp=".venv/.installed-$extras"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        .venv/bin/python -m pip install --quiet --upgrade pip
        .venv/bin/python -m pip install --quiet -e ".[$extras]"
        touch "$stamp"
    fi
}

# Starts the machine's own PostgreSQL and Redis when they are down (only on 127.0.0.1 defaults).
ensure_services() {
    if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1 -p 5432; then
        if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
            echo "starting PostgreSQL" >&2
            pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start
        fi
    fi
    if command -v redis-cli >/dev/null && ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
        if command -v redis-server >/dev/null; then
            echo "starting Redis" >&2
            mkdir -p /tmp/smsgate-redis
            redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" \
                --appendonly no --dir /tmp/smsgate-redis --logfile /tmp/smsgate-redis/redis.log
        fi
    fi
    for _ in $(seq 1 50); do
        pg_ready=1; redis_ready=1
        command -v pg_isready >/dev/null && { pg_isready -q -h 127.0.0.1 -p 5432 || pg_ready=0; }
        command -v redis-cli >/dev/null && { redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 || redis_ready=0; }
        [ "$pg_ready" = 1 ] && [ "$redis_ready" = 1 ] && return 0
        sleep 0.2
    done
    echo "PostgreSQL or Redis is not reachable on 127.0.0.1; set DATABASE_URL and REDIS_URL" >&2
    return 1
}
