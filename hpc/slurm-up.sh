#!/usr/bin/env bash
# Bring up a real Slurm on this machine (munge + MariaDB + slurmdbd + slurmctld + slurmd), so that
# sbatch/srun/squeue/sacct/scancel/scontrol and submitit all work. Debian bookworm, as root, no
# systemd needed. Re-running it is safe (already-running daemons are left alone).
#
# Partition "debug" (default): this machine as one node. Partition "two": two more nodes, dpo-n1
# and dpo-n2, each a slurmd in a network (and hostname and mount) namespace of its own, joined by
# a bridge the script creates (10.77.0.0/24; traffic only between the namespaces and this host),
# so multi-node jobs (srun across nodes, MASTER_ADDR from the node list) really cross a network.
# If the namespaces cannot be made, "two" is left out and /run/dpo-hpc-two-nodes.status says why.
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
NODE=$(hostname -s)  # not "localhost": Slurm 22.05 then refuses any second node (Duplicated NodeHostName)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /run/mysqld
chown munge:munge /run/munge; chown mysql:mysql /run/mysqld

# --- the two namespace nodes' network: a bridge here, a veth into each namespace ---
TWO=/run/dpo-hpc-two-nodes.status
BRIDGE_IP=10.77.0.1
two_nodes_network() {
  ip link show br-dpo >/dev/null 2>&1 || { ip link add br-dpo type bridge && ip addr add "$BRIDGE_IP/24" dev br-dpo; } || return 1
  ip link set br-dpo up || return 1
  for i in 1 2; do
    ip netns list | grep -qw "dpo-n$i" && continue
    ip netns add "dpo-n$i" && ip link add "dpo-v$i" type veth peer name "dpo-v${i}n" \
      && ip link set "dpo-v$i" master br-dpo && ip link set "dpo-v$i" up && ip link set "dpo-v${i}n" netns "dpo-n$i" \
      && ip -n "dpo-n$i" addr add "10.77.0.1$i/24" dev "dpo-v${i}n" && ip -n "dpo-n$i" link set "dpo-v${i}n" up \
      && ip -n "dpo-n$i" link set lo up || return 1
  done
  for i in 1 2; do grep -q " dpo-n$i\$" /etc/hosts || echo "10.77.0.1$i dpo-n$i" >> /etc/hosts; done
}
if out=$(two_nodes_network 2>&1); then
  echo "up: dpo-n1 (10.77.0.11) and dpo-n2 (10.77.0.12) in network namespaces, bridge br-dpo" > "$TWO"
  CTLD_ADDR=$BRIDGE_IP
else
  echo "not made: two_nodes_network failed: ${out:-no message}" > "$TWO"; cat "$TWO" >&2
  CTLD_ADDR=127.0.0.1
fi

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
SlurmctldHost=${NODE}(${CTLD_ADDR})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# requeued jobs become eligible again after cred_expire seconds (default 120)
AuthInfo=cred_expire=5
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
# in the spool dir, which each namespace node has of its own (a bind mount)
SlurmdPidFile=/var/spool/slurmd/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
# a requeued job's begin time passing is no event: without a short periodic pass it waits ~20 s
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,bf_interval=1,sched_interval=2
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
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
CONF
if [ "$CTLD_ADDR" = "$BRIDGE_IP" ]; then
  cat >> /etc/slurm/slurm.conf <<CONF
NodeName=dpo-n1 NodeAddr=10.77.0.11 CPUs=1 RealMemory=$(( MEM / 4 )) State=UNKNOWN
NodeName=dpo-n2 NodeAddr=10.77.0.12 CPUs=1 RealMemory=$(( MEM / 4 )) State=UNKNOWN
PartitionName=two Nodes=dpo-n[1-2] MaxTime=INFINITE State=UP
CONF
fi

alive /run/slurmdbd.pid || slurmdbd
waitfor 30 sacctmgr -n list cluster
sacctmgr -nP list cluster format=cluster | grep -qx localcluster || sacctmgr -i add cluster localcluster >/dev/null
alive /run/slurmctld.pid || slurmctld
waitfor 30 timeout 5 scontrol ping
alive /var/spool/slurmd/slurmd.pid || slurmd -N "$NODE"
if [ "$CTLD_ADDR" = "$BRIDGE_IP" ]; then
  for i in 1 2; do
    spool=/var/spool/slurmd-dpo-n$i; mkdir -p "$spool"
    # nsenter, not "ip netns exec", which remounts /sys and so hides the cgroup mounts slurmd needs
    alive "$spool/slurmd.pid" || nsenter --net="/run/netns/dpo-n$i" unshare --uts --mount --propagation private sh -c \
      "hostname dpo-n$i && mount --bind $spool /var/spool/slurmd && exec slurmd -N dpo-n$i -L /var/log/slurm/slurmd-dpo-n$i.log"
  done
  waitfor 60 sh -c "timeout 5 sinfo -h -p two -o '%D %T' | grep -qE '^2 (idle|mixed|allocated)'"
fi
waitfor 30 sh -c "timeout 5 sinfo -h -p debug -o %T | grep -qE '^(idle|mixed|allocated)'"
sinfo
