#!/bin/sh
# Install the edgepack agent into the root file system this runs in: a Containerfile's RUN (with the
# build context mounted) or scripts/build-image's chroot into a Debian root file system. One recipe for
# both, so a Containerfile image and a built-here image hold the same files:
#
#   /opt/edgepack/                      a venv with edgepack[<runtime extra>], byte-compiled, no pip
#   /usr/lib/systemd/system/edgepack-agent.service   enabled for multi-user.target
#   /usr/lib/sysusers.d/edgepack.conf   the edgepack user and group (created here too)
#   /etc/edgepack/agent.toml            the class's default configuration
#   /etc/edgepack/trust/                the fleet trust root            (context: trust/)
#   /etc/edgepack/{device.pem,device.key,ca.pem}  device identity        (context: identity/, optional)
#   /usr/share/edgepack/factory/*.epk   installed at first boot         (context: factory/, optional)
#   /var/lib/edgepack/                  the state directory (systemd's StateDirectory= owns it on a device)
#
# Usage: sh install-agent.sh CONTEXT   (CONTEXT holds image.env, wheels/, the class files, trust/ ...)
set -eu
CTX=${1:?usage: install-agent.sh CONTEXT}
# shellcheck disable=SC1091
. "$CTX/image.env"   # REQUIREMENT (pip requirement with the runtime extra), PIP_ARGS (index options)
: "${REQUIREMENT:?image.env must set REQUIREMENT}"
PIP_ARGS=${PIP_ARGS:---no-index}
VENV_ARGS=${VENV_ARGS:-}
VENV=/opt/edgepack

if [ ! -f "$CTX/trust/trust.json" ]; then
  echo "install-agent.sh: $CTX/trust/trust.json is missing: the image needs the fleet's trust root" >&2
  exit 1
fi

# the venv, without pip: pip runs from its wheel for this one install and is not left on the device
# shellcheck disable=SC2086
python3 -m venv --without-pip $VENV_ARGS "$VENV"
set -- "$CTX"/wheels/pip-*.whl
[ -f "$1" ] || { echo "install-agent.sh: no pip wheel in $CTX/wheels" >&2; exit 1; }
# shellcheck disable=SC2086  # PIP_ARGS and REQUIREMENT are word lists
"$VENV/bin/python3" "$1/pip" install --quiet --disable-pip-version-check --no-cache-dir --only-binary=:all: \
  $PIP_ARGS --find-links "$CTX/wheels" $REQUIREMENT
"$VENV/bin/edgepack" --version >/dev/null

# the user, from the same sysusers.d file systemd reads at boot
install -D -m 0644 "$CTX/edgepack.sysusers" /usr/lib/sysusers.d/edgepack.conf
if command -v systemd-sysusers >/dev/null 2>&1; then
  systemd-sysusers /usr/lib/sysusers.d/edgepack.conf
elif ! getent passwd edgepack >/dev/null; then
  useradd --system --user-group --home-dir /var/lib/edgepack --no-create-home --shell /usr/sbin/nologin edgepack
fi

# the service, enabled the way systemctl enable would
install -D -m 0644 "$CTX/edgepack-agent.service" /usr/lib/systemd/system/edgepack-agent.service
mkdir -p /etc/systemd/system/multi-user.target.wants
ln -sf /usr/lib/systemd/system/edgepack-agent.service /etc/systemd/system/multi-user.target.wants/edgepack-agent.service

# configuration, trust root, identity: root's, readable by the agent; the key by its group only
install -d -m 0755 /etc/edgepack /etc/edgepack/trust
install -m 0644 "$CTX/agent.toml" /etc/edgepack/agent.toml
cp -R "$CTX/trust/." /etc/edgepack/trust/
chown -R root:root /etc/edgepack/trust
chmod -R u=rwX,go=rX /etc/edgepack/trust
for name in device.pem ca.pem; do
  if [ -f "$CTX/identity/$name" ]; then install -m 0644 "$CTX/identity/$name" "/etc/edgepack/$name"; fi
done
if [ -f "$CTX/identity/device.key" ]; then
  install -m 0640 -o root -g edgepack "$CTX/identity/device.key" /etc/edgepack/device.key
fi

# factory bundles, installed by the agent at first boot when its store is empty (agent/factory.py)
install -d -m 0755 /usr/share/edgepack/factory
for bundle in "$CTX"/factory/*.epk; do
  if [ -f "$bundle" ]; then install -m 0644 "$bundle" /usr/share/edgepack/factory/; fi
done

# the state directory, for container runtimes; on a device systemd's StateDirectory= takes it over
install -d -m 0750 -o edgepack -g edgepack /var/lib/edgepack
