#!/bin/sh
# Runs last in the build VM: the image must hold no identity and nothing the
# build left, so every node booted from it starts as a new machine (DESIGN.md:
# the image is generic; identity comes from the node's seed).
set -eu

# Instance state, logs and the build's NoCloud seed: cloud-init runs in full on
# the next boot. It leaves the network config it rendered; that goes too.
cloud-init clean --logs --seed
rm -f /etc/systemd/network/10-cloud-init-*.network

# Empty, not deleted: systemd fills it in on first boot (a missing file breaks
# read-only roots and some tools); dbus's copy would pin the build's id.
truncate -s 0 /etc/machine-id
rm -f /var/lib/dbus/machine-id
# Stopped first: on stop (and so at shutdown, after this script) it saves a new
# seed, which every node would then share.
systemctl stop systemd-random-seed.service
rm -f /var/lib/systemd/random-seed /var/lib/systemd/credential.secret

# New host keys per node (cloud-init's ssh module, or clusterforge-ssh-keygen).
rm -f /etc/ssh/ssh_host_*
# The build's throwaway key (root's on Debian, the forge user's on Ubuntu), and anything root's session wrote.
rm -rf /root/.ssh /home/*/.ssh
rm -f /root/.bash_history /root/.python_history /root/.lesshst /root/.wget-hsts

# The build VM's journal, login records and temporary files. journald moves to
# /run first, or it recreates /var/log/journal/<build machine id> at shutdown;
# utmp's shutdown record is written when its unit stops, so that goes first too.
journalctl --relinquish-var
rm -rf /var/log/journal/*
systemctl stop systemd-update-utmp.service
for f in /var/log/wtmp /var/log/btmp /var/log/lastlog; do
    if [ -f "$f" ]; then truncate -s 0 "$f"; fi
done
rm -f /var/lib/chrony/chrony.drift
rm -rf /tmp/* /tmp/.[!.]* /var/tmp/* /var/tmp/.[!.]*
sync
echo "clusterforge: identity reset"
