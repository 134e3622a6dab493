#!/usr/bin/env bash
# Stop what slurm-up.sh started, by pid file (never by process name: a name could match someone
# else's daemon, and zombies linger in some sandboxes).
set -u
for f in /var/spool/slurmd-dpo-n*/slurmd.pid /var/spool/slurmd/slurmd.pid /run/slurmd.pid /run/slurmctld.pid /run/slurmdbd.pid; do
  [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null
done
[ -s /run/mysqld/mysqld.pid ] && mysqladmin shutdown 2>/dev/null
[ -s /run/munge/munged.pid ] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null
sleep 1
for i in 1 2; do ip netns del "dpo-n$i" 2>/dev/null; done  # the two namespace nodes and their bridge
ip link del br-dpo 2>/dev/null
exit 0
