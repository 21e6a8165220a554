#!/bin/bash
# The start of every host of the Docker test cluster: `hpcfed-node.sh controller|compute|login|hub`.
# Runs as the container's main process (under docker-init), starts the host's daemons, writes
# /run/hpcfed-node.ready once they answer, and stops them on SIGTERM (`docker stop`).
# Settings come from the environment docker-compose.yml gives each service. Idempotent: a
# restarted container (docker stop/start) keeps its file system and starts the daemons again.
set -euo pipefail
role="$1"
say() { echo "hpcfed-node[$role]: $*"; }
# A restarted container keeps /run: stale pid files would name other processes now.
rm -f /run/hpcfed-node.ready /run/slurm*.pid /run/mysqld/mysqld.pid

# ---- munge: one key per cluster, created by the controller in the shared `munge` volume
munge_up() {
    if [ "$role" = controller ] && [ ! -s /etc/munge/munge.key ]; then
        say "creating this cluster's munge key"
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
    fi
    for _ in $(seq 300); do [ -s /etc/munge/munge.key ] && break; sleep 0.2; done
    [ -s /etc/munge/munge.key ] || { say "no munge key after 60 s"; exit 1; }
    install -d -o munge -g munge -m 0755 /run/munge
    rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
    runuser -u munge -- /usr/sbin/munged
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq $((seconds * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    say "$what did not come up in $seconds s"
    exit 1
}

# ---- compute nodes: out of the node only Slurm and UDP to the hub's WireGuard port
firewall() {
    local ipt=iptables
    $ipt -S OUTPUT >/dev/null 2>&1 || ipt=iptables-legacy
    $ipt -F OUTPUT
    $ipt -A OUTPUT -o lo -j ACCEPT
    $ipt -A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    $ipt -A OUTPUT -p tcp -d "$HPCFED_CTLD_IP" --dport "$HPCFED_SLURMCTLD_PORT" -j ACCEPT
    $ipt -A OUTPUT -p tcp -d "$HPCFED_CLUSTER_SUBNET" --dport "$HPCFED_SLURMD_PORT" -j ACCEPT
    $ipt -A OUTPUT -p udp -d "$HPCFED_HUB_IP" --dport "$HPCFED_WG_PORT" -j ACCEPT
    # REJECT, not DROP: a blocked connect fails at once instead of after a timeout.
    $ipt -A OUTPUT -p tcp -j REJECT --reject-with tcp-reset
    $ipt -A OUTPUT -j REJECT --reject-with icmp-admin-prohibited
    if command -v ip6tables >/dev/null; then
        ip6tables -P OUTPUT DROP 2>/dev/null || ip6tables-legacy -P OUTPUT DROP 2>/dev/null || true
    fi
    say "firewall: out only to slurmctld:$HPCFED_SLURMCTLD_PORT, slurmd:$HPCFED_SLURMD_PORT, UDP $HPCFED_HUB_IP:$HPCFED_WG_PORT"
}

# Apptainer's --containall mounts a fresh /proc in a new PID namespace; the kernel refuses that
# while parts of /proc are hidden by other mounts, and Docker hides some (/proc/keys, a
# read-only /proc/sys, ...). docker-compose cannot ask for `systempaths=unconfined`, so undo
# them here (a test cluster: the host's /proc is no secret to its own containers).
unmask_proc() {
    local p
    for p in $(awk '$2 ~ "^/proc/" {print $2}' /proc/self/mounts | sort -r); do
        umount "$p" 2>/dev/null || umount -l "$p" || say "cannot unmask $p"
    done
}

fake_gpus() {
    local i
    for i in $(seq 0 $((HPCFED_GPUS - 1))); do
        # Same major as the NVIDIA driver; Slurm's gres needs a character device, not a file.
        [ -c "/dev/nvidia$i" ] || mknod -m 0666 "/dev/nvidia$i" c 195 "$i"
    done
}

controller() {
    munge_up
    if [ ! -d /var/lib/mysql/mysql ]; then
        say "initialising MariaDB"
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql \
            --auth-root-authentication-method=socket --skip-test-db >/dev/null
    fi
    install -d -o mysql -g mysql /run/mysqld
    # --skip-ssl: MariaDB 11.8 (trixie) turns TLS on by itself, and slurmdbd 24.11's queries
    # over that TLS connection fail (`_check_mysql_concat_is_sane: null result`, client error
    # 5027). The database listens on 127.0.0.1 only.
    mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
        --bind-address=127.0.0.1 --port=3306 --skip-name-resolve --skip-ssl \
        --innodb-buffer-pool-size=32M --log-error=/var/log/slurm/mariadb.err &
    wait_for 60 MariaDB mariadb-admin --skip-ssl --socket=/run/mysqld/mysqld.sock ping
    local pass
    pass=$(sed -n 's/^StoragePass=//p' "$(dirname "$SLURM_CONF")/slurmdbd.conf")
    # The password goes through stdin, never argv.
    mariadb --skip-ssl --socket=/run/mysqld/mysqld.sock -u root <<SQL
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL
    slurmdbd -D &
    wait_for 60 slurmdbd sacctmgr -n list cluster
    sacctmgr -i add cluster "$HPCFED_CLUSTER" >/dev/null 2>&1 || true
    sacctmgr -i add account "$HPCFED_ACCOUNT" Description=hpcfed Organization=hpcfed >/dev/null 2>&1 || true
    sacctmgr -i add user root "account=$HPCFED_ACCOUNT" >/dev/null 2>&1 || true
    sacctmgr -i add user "$HPCFED_USER" "account=$HPCFED_ACCOUNT" >/dev/null 2>&1 || true
    slurmctld -D &
    wait_for 60 slurmctld scontrol ping
}

compute() {
    unmask_proc
    firewall
    fake_gpus
    munge_up
    slurmd -D -N "$(hostname)" &
}

login() {
    unmask_proc
    munge_up
    [ -s /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -A >/dev/null
    /usr/sbin/sshd
    cron
}

hub() {
    # Docker mounts /proc/sys read-only; the hub routes between peers (ip_forward).
    mount -o remount,rw /proc/sys
    # The hub's own key is created once per container (kept across docker stop/start).
    [ -d /etc/hpcfed/hub ] || hpcfed hub init --endpoint "$HPCFED_HUB_IP:$HPCFED_WG_PORT" \
        --dir /etc/hpcfed/hub >/dev/null
    hpcfed hub up --userspace --dir /etc/hpcfed/hub
}

stop_all() {
    say "stopping"
    kill $(jobs -p) 2>/dev/null || true
    [ -s /run/munge/munged.pid ] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
    wait || true
    exit 0
}
trap stop_all TERM INT

case "$role" in
    controller) controller ;;
    compute) compute ;;
    login) login ;;
    hub) hub ;;
    *) say "unknown role (controller|compute|login|hub)"; exit 2 ;;
esac
touch /run/hpcfed-node.ready
say "ready"
# Keep the container alive; a daemon started here with & that dies ends the container.
sleep infinity &
wait -n
say "a daemon exited: stopping the container"
stop_all
