#!/usr/bin/env bash
# The two commands of the README.  Each sets up everything on a fresh machine first:
#   ./dev.sh demo   set up, then migrate a memstress VM between two local processes
#   ./dev.sh test   set up, then run lint, type checks and the whole test suite
# Set-up is idempotent: Debian packages only when something is missing, a venv in .venv,
# and an editable install that compiles the cffi extension against the kernel headers.
set -euo pipefail
cd "$(dirname "$0")"

need_apt=()
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
[ -f /usr/include/linux/kvm.h ] && [ -f /usr/include/linux/userfaultfd.h ] || need_apt+=(linux-libc-dev)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v nft >/dev/null 2>&1 || need_apt+=(nftables)

setup() {
    if [ ${#need_apt[@]} -gt 0 ]; then
        echo "dev.sh: installing Debian packages: ${need_apt[*]}" >&2
        if [ "$(id -u)" -eq 0 ]; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
        else
            sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
        fi
    fi
    local py=${PYTHON:-python3}
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "dev.sh: migrated needs Python 3.11 or newer (found: $("$py" --version 2>&1))" >&2
        exit 2
    fi
    if [ ! -x .venv/bin/python ]; then
        "$py" -m venv .venv
    fi
    .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
    .venv/bin/python -m pip install -q -e '.[test]'
}

case "${1:-}" in
    demo)
        shift
        setup
        exec .venv/bin/migrated demo "$@"
        ;;
    test)
        shift
        setup
        echo "dev.sh: ruff" >&2
        .venv/bin/ruff check migrated tests bench
        .venv/bin/ruff format --check migrated tests bench
        echo "dev.sh: mypy" >&2
        .venv/bin/mypy migrated
        echo "dev.sh: pytest" >&2
        # A KVM or userfaultfd test that skips while /dev/kvm and userfaultfd work here
        # fails the run (tests/conftest.py).
        MIGRATED_REQUIRE_KVM=1 exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
        ;;
    *)
        echo "usage: ./dev.sh demo [demo options] | ./dev.sh test [pytest options]" >&2
        exit 2
        ;;
esac
