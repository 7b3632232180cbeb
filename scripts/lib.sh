# Shared by scripts/run and scripts/test: a virtualenv with the project installed, and local
# PostgreSQL and Redis started if they are installed here but not running.

require_python() {
    PYTHON=${PYTHON:-python3}
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "smsgate needs Python 3.11 or newer as \$PYTHON or python3" >&2
        exit 1
    fi
}

# Installs into .venv exactly the versions in requirements/$1.txt (hashes checked), then the
# project itself (editable, no dependencies of its own choosing); again only when the lock or
# pyproject.toml changed since the last install. `./scripts/lock` regenerates the locks.
ensure_venv() {
    local extras=$1
    local lock="requirements/$extras.txt"
    require_python
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    local stamp=".venv/.installed-$extras"
    if [ ! -f "$stamp" ] || [ "$lock" -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "installing the locked dependencies into .venv ($lock)" >&2
        PIP_DISABLE_PIP_VERSION_CHECK=1 .venv/bin/python -m pip install --quiet \
            --require-hashes -r "$lock"
        PIP_DISABLE_PIP_VERSION_CHECK=1 .venv/bin/python -m pip install --quiet \
            --no-deps --no-build-isolation -e .
        touch "$stamp"
    fi
}

# True when something accepts connections on 127.0.0.1:$1 (bash's /dev/tcp: no client needed).
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

postgres_up() {
    if command -v pg_isready >/dev/null; then pg_isready -q -h 127.0.0.1 -p 5432; else port_open 5432; fi
}

redis_up() {
    if command -v redis-cli >/dev/null; then
        redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1
    else
        port_open 6379
    fi
}

# Starts the machine's own PostgreSQL and Redis when they are down (only on 127.0.0.1 defaults).
# Fails, quietly, when either is still not reachable: the caller decides what to do then.
ensure_services() {
    local started=0
    if ! postgres_up && command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
        echo "starting PostgreSQL" >&2
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start \
            && started=1
    fi
    if ! redis_up && command -v redis-server >/dev/null; then
        echo "starting Redis" >&2
        mkdir -p /tmp/smsgate-redis
        redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" \
            --appendonly no --dir /tmp/smsgate-redis --logfile /tmp/smsgate-redis/redis.log \
            && started=1
    fi
    for _ in $(seq 1 50); do
        postgres_up && redis_up && return 0
        [ "$started" = 1 ] || return 1  # nothing is starting: no point in waiting
        sleep 0.2
    done
    return 1
}

# Tools two test modules drive: Debian's `chromium` (tests/test_docs_browser.py renders /docs and
# /redoc in it) and `promtool` from Debian's `prometheus` (tests/test_alerts.py). Installed with
# apt-get when missing, as root (CI) or through password-less sudo; otherwise a note says how,
# and those tests fail naming what is missing. CHROMIUM / PROMTOOL may point at other copies.
ensure_test_tools() {
    local missing=()
    [ -n "${CHROMIUM:-}" ] || command -v chromium >/dev/null || missing+=(chromium)
    [ -n "${PROMTOOL:-}" ] || command -v promtool >/dev/null || missing+=(prometheus)
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=()
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            echo "note: the browser and alert-rule tests need ${missing[*]}:" \
                "sudo apt-get install ${missing[*]} (or set CHROMIUM / PROMTOOL)" >&2
            return 0
        fi
    fi
    if ! command -v apt-get >/dev/null; then
        echo "note: install ${missing[*]} (Debian's packages) for the browser and alert-rule tests" >&2
        return 0
    fi
    echo "installing ${missing[*]} with apt-get (for the browser and alert-rule tests)" >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
}
