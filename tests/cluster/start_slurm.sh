#!/usr/bin/env bash
# A one-node SLURM cluster for the tests: Debian's slurmctld, slurmd and munge, started without systemd or cgroups.
# Idempotent: where the node is already up, a second call prints so and does nothing. Where SLURM cannot be installed
# or started (no root, no apt-get), it says why and exits 0: the tests that need SLURM then skip with that reason.
set -uo pipefail
say() { echo "slurm: $*"; }
up() { sinfo -h -N -o "%T" 2>/dev/null | grep -Eq "^(idle|mixed|allocated)"; }

# the configuration: this host, its CPUs and memory, one CPU partition
config() {
  local host cpus mem
  host=$(hostname -s); cpus=$(nproc --all); mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  cat <<CONF
# Written by tests/cluster/start_slurm.sh: a one-node test cluster.
ClusterName=stmn-test
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it starts again (default 120); the scheduler looks every 2 s.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
MinJobAge=3600
KillWait=10
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
# OverSubscribe=FORCE:4: up to four tasks share a CPU, so that the tests' tasks (mostly waiting) run side by side.
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
}

if command -v sinfo >/dev/null && up && [ "$(config)" = "$(cat /etc/slurm/slurm.conf 2>/dev/null)" ]; then
  say "already up ($(sinfo -h -o '%P %D %T' | tr '\n' ' '))"; exit 0
fi
if [ "$(id -u)" != 0 ]; then say "not started: needs root (apt-get, daemons); the SLURM tests will be skipped"; exit 0; fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || { say "not installed and no apt-get; the SLURM tests will be skipped"; exit 0; }
  say "installing slurmctld slurmd slurm-client munge with apt-get"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge >/dev/null; } || { say "apt-get failed; the SLURM tests will be skipped"; exit 0; }
fi

# munge: a key, its run folder, the daemon (as the munge user, as Debian's service does)
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; }
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
pgrep -x munged >/dev/null || su -s /bin/sh munge -c "/usr/sbin/munged" || { say "munged did not start; the SLURM tests will be skipped"; exit 0; }

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
if [ "$(config)" != "$(cat /etc/slurm/slurm.conf 2>/dev/null)" ]; then      # new or changed: (re)start with it
  config > /etc/slurm/slurm.conf
  pkill -x slurmd; pkill -x slurmctld; for _ in $(seq 20); do { pgrep -x slurmd || pgrep -x slurmctld; } >/dev/null || break; sleep .5; done
fi
pgrep -x slurmctld >/dev/null || slurmctld || { say "slurmctld did not start (see /var/log/slurm/slurmctld.log)"; exit 0; }
pgrep -x slurmd >/dev/null || slurmd || { say "slurmd did not start (see /var/log/slurm/slurmd.log)"; exit 0; }
for _ in $(seq 60); do up && break; sleep 1; done
if up; then say "up: $(sinfo -h -o 'partition %P, %D node(s), %c CPUs, %T')"
else say "the node did not become idle in 60 s ($(sinfo -h -N -o '%T %E' 2>&1)); the SLURM tests will be skipped"; fi
exit 0
