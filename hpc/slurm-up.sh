#!/usr/bin/env bash
# Bring up a real single-node Slurm on localhost (munge + MariaDB + slurmdbd + slurmctld + slurmd),
# so that sbatch/srun/squeue/sacct/scancel/scontrol and submitit all work. Debian bookworm, as root,
# no systemd needed. Re-running it is safe (already-running daemons are left alone).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client slurmdbd munge mariadb-server >/dev/null
fi
alive() {  # alive PIDFILE -> true if that pid runs and is not a zombie
  [ -s "$1" ] || return 1; local p; p=$(cat "$1")
  [ -r /proc/$p/status ] && ! grep -q '^State:[[:space:]]*Z' /proc/$p/status
}
waitfor() {  # waitfor SECONDS CMD...  (poll every 0.5 s)
  local n=$(( $1 * 2 )); shift
  for _ in $(seq $n); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "timeout waiting for: $*" >&2; return 1
}
CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 512 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /run/mysqld
chown munge:munge /run/munge; chown mysql:mysql /run/mysqld

# --- munge (the Debian package already generated /etc/munge/munge.key) ---
[ -s /etc/munge/munge.key ] || { mungekey -c -k /etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
alive /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
waitfor 10 sh -c 'munge -n | unmunge'

# --- MariaDB, only so that slurmdbd can store accounting (sacct needs it; submitit calls sacct) ---
if ! mysqladmin ping >/dev/null 2>&1; then
  (setsid mysqld_safe --skip-syslog >/var/log/slurm/mysqld_safe.log 2>&1 &)
  waitfor 60 mysqladmin ping
fi
mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

cat > /etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
CONF
chmod 600 /etc/slurm/slurmdbd.conf

cat > /etc/slurm/slurm.conf <<CONF
ClusterName=localcluster
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# requeued jobs become eligible again after cred_expire seconds (default 120)
AuthInfo=cred_expire=10
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF

alive /run/slurmdbd.pid || slurmdbd
waitfor 30 sacctmgr -n list cluster
sacctmgr -nP list cluster format=cluster | grep -qx localcluster || sacctmgr -i add cluster localcluster >/dev/null
alive /run/slurmctld.pid || slurmctld
waitfor 30 timeout 5 scontrol ping
alive /run/slurmd.pid || slurmd -N localhost
waitfor 30 sh -c "timeout 5 sinfo -h -o %T | grep -qE '^(idle|mixed|allocated)'"
sinfo
