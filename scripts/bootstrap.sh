# Shared by scripts/serve and scripts/test: a virtual environment with the project installed.
# Sourced, not run. Honours VNA_VENV (default: .venv in the repository) and VNA_EXTRAS.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VNA_VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"

as_root() { [ "$(id -u)" = 0 ]; }

apt_install() {
    # Installs Debian packages when we are root; otherwise says what is missing.
    if as_root; then
        if [ -z "${VNA_APT_UPDATED:-}" ]; then
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            export VNA_APT_UPDATED=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    else
        echo "missing system packages: $* (run as root, or: sudo apt-get install $*)" >&2
        return 1
    fi
}

ensure_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
            rm -rf "$VENV"
            apt_install python3-venv
            "$PYTHON" -m venv "$VENV"
        fi
    fi
    local stamp="$VENV/.vna-installed"
    local want
    want="$(cat "$REPO/pyproject.toml" | sha256sum | cut -c1-16)-${VNA_EXTRAS:-}"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
        "$VENV/bin/python" -m pip install -q -e "$REPO${VNA_EXTRAS:+[$VNA_EXTRAS]}"
        echo "$want" > "$stamp"
    fi
    link_rados
}

link_rados() {
    # Exposes Debian's librados binding (python3-rados, for storage.backend rados) to the venv: only that one
    # module, through a .pth naming a folder that holds a symlink to it, not all of dist-packages.
    # Nothing happens when python3-rados is not installed.
    local suffix site so
    read -r suffix site < <("$VENV/bin/python" -c \
        'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"), sysconfig.get_paths()["purelib"])')
    so="/usr/lib/python3/dist-packages/rados$suffix"
    [ -f "$so" ] || return 0
    mkdir -p "$VENV/vna-rados"
    ln -sfn "$so" "$VENV/vna-rados/rados$suffix"
    echo "$VENV/vna-rados" > "$site/vna-rados.pth"
}
