# Shared by scripts/demo and scripts/test: make .venv and install what the project needs, once.
# Usage: source scripts/lib/env.sh; ensure_venv EXTRAS; ensure_mosquitto
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$REPO/.venv"

pick_python() {
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3.10 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "edgepack needs Python 3.10 or newer; set PYTHON=/path/to/python3" >&2
  return 1
}

# ensure_venv EXTRAS: create .venv when missing and install edgepack (editable) with EXTRAS.
# Skips pip when pyproject.toml and the extras are unchanged since the last install.
ensure_venv() {
  local extras="$1"
  if [ ! -x "$VENV/bin/python" ]; then
    local py; py="$(pick_python)"
    echo "creating $VENV with $py" >&2
    "$py" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
  fi
  local stamp="$VENV/.edgepack-$extras.stamp"
  local want; want="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "installing edgepack[$extras] into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$REPO[$extras]"
    echo "$want" > "$stamp"
  fi
}

# ensure_mosquitto: the MQTT tests and the demo want a real mosquitto binary.
ensure_mosquitto() {
  if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then return 0; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing mosquitto with apt-get" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && command -v apt-get >/dev/null 2>&1; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
  else
    echo "mosquitto is not installed and cannot be installed here (no root/apt); MQTT tests will say so" >&2
  fi
}

# ensure_arm_tools: the ARM proof (tests/arm, scripts/arm-check) wants qemu-user-static and mmdebstrap.
ensure_arm_tools() {
  if command -v qemu-aarch64-static >/dev/null 2>&1 && command -v mmdebstrap >/dev/null 2>&1; then return 0; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing qemu-user-static and mmdebstrap with apt-get" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      qemu-user-static mmdebstrap uidmap >/dev/null
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && command -v apt-get >/dev/null 2>&1; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      qemu-user-static mmdebstrap uidmap >/dev/null
  else
    echo "qemu-user-static/mmdebstrap are not installed and cannot be installed here; the ARM tests will say so" >&2
  fi
}

# ensure_image_tools: the firmware image tests (tests/firmware) build an OCI image from a Debian root file
# system (mmdebstrap, buildah, skopeo, umoci) and check the systemd units (systemd-analyze).
ensure_image_tools() {
  local missing=""
  for tool in mmdebstrap buildah skopeo umoci systemd-analyze; do command -v "$tool" >/dev/null 2>&1 || missing=1; done
  [ -n "$missing" ] || return 0
  local pkgs="mmdebstrap buildah skopeo umoci systemd arch-test"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing $pkgs with apt-get" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && command -v apt-get >/dev/null 2>&1; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
  else
    echo "$pkgs are not all installed and cannot be installed here; the firmware image tests will say so" >&2
  fi
}

# ensure_strace: tests/agent/test_fsync_order.py checks the fsync-before-rename order under strace.
ensure_strace() {
  command -v strace >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing strace with apt-get" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends strace >/dev/null
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && command -v apt-get >/dev/null 2>&1; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends strace >/dev/null
  else
    echo "strace is not installed and cannot be installed here; the fsync order test will say so" >&2
  fi
}
