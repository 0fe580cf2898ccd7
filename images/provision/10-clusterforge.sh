#!/bin/sh
# Lays in what the build uploaded as one tar (modes and symlinks survive, unlike
# a directory upload): overlays/common over /, the role overlays where the agent
# applies them per node, and the node package for the image's python3.
set -eu
payload=${CLUSTERFORGE_PAYLOAD:?}
work=$(mktemp -d)
tar -xf "$payload" -C "$work"

cp -a "$work/overlays/common/." /
rm -rf /usr/share/clusterforge/overlays
mkdir -p /usr/share/clusterforge/overlays
for role in "$work"/overlays/*/; do
    name=$(basename "$role")
    [ "$name" = common ] || cp -a "$role" "/usr/share/clusterforge/overlays/$name"
done

# Debian's python3 looks here; no venv, so the agent needs only the image.
site=/usr/lib/python3/dist-packages/clusterforge
rm -rf "$site"
cp -a "$work/clusterforge" "$site"
python3 -B -c 'import clusterforge.node.agent.loop, clusterforge.node.installer'
# Byte-compiled once here instead of on every node's first run.
python3 -m compileall -q "$site"

# The agent runs on every boot; the stock etcd unit never does (it would make a
# one-member cluster of its own in /var/lib/etcd, and nothing could join it later).
systemctl daemon-reload 2>/dev/null || true
systemctl enable clusterforge-agent.service
systemctl mask etcd.service

rm -rf "$work" "$payload"
echo "clusterforge: payload installed"
