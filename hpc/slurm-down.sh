#!/usr/bin/env bash
# Stop what slurm-up.sh started, by pid file (never by process name: a name could match someone
# else's daemon, and zombies linger in some sandboxes).
set -u
for f in /run/slurmd.pid /run/slurmctld.pid /run/slurmdbd.pid; do
  [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null
done
[ -s /run/mysqld/mysqld.pid ] && mysqladmin shutdown 2>/dev/null
[ -s /run/munge/munged.pid ] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null
sleep 1
exit 0
