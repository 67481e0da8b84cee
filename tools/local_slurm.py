#!/usr/bin/env python
"""Start and stop a throwaway local SLURM cluster (munge + slurmctld + N emulated slurmd nodes).

Used by tests/slurm and for trying the slurm/ scripts on one machine:

    python tools/local_slurm.py start --dir /tmp/vqd_slurm      # prints `export SLURM_CONF=...`
    export SLURM_CONF=/tmp/vqd_slurm/slurm.conf; sbatch ...; squeue
    # node-failure drill: a node set DOWN stays down (--return-to-service 1, the default) until resumed
    scontrol update NodeName=node2 State=DOWN Reason=drill; ...; scontrol update NodeName=node2 State=RESUME
    python tools/local_slurm.py stop --dir /tmp/vqd_slurm

Everything lives in --dir (config, munge key and socket, state, spool, logs, pids.json). The only
change outside it is one marked line `127.0.0.1 node1 node2` in /etc/hosts (so MASTER_ADDR=node1
resolves), removed again by `stop`. `stop` ends only the daemons this tool started (PIDs in pids.json).
The configuration follows the facts in /work/shared/spec/scale_plumbing.md ("Local SLURM for tests").
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

APT_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# vqd_scale local_slurm"


class SlurmSetupError(RuntimeError):
    """The local cluster could not be installed or started; the message says why and where to look."""


def ensure_installed() -> None:
    """Install Debian's slurm + munge with apt when `slurmctld` is missing; raise loudly if impossible."""
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise SlurmSetupError("slurm is not installed and this is not root: run "
                              f"`apt-get install -y {' '.join(APT_PACKAGES)}` as root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *APT_PACKAGES]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SlurmSetupError(f"`{' '.join(cmd)}` failed (rc={r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def render_conf(root: Path, nodes: list[str], cpus: int, ctld_port: int, node_ports: list[int],
                return_to_service: int = 1) -> str:
    """slurm.conf text for a one-machine cluster rooted at `root` (no cgroups, no accounting).

    `return_to_service` is slurm.conf's ReturnToService: 1 (default) brings back a node that was DOWN
    for not responding when its slurmd registers again, but keeps one set DOWN by hand (a node-failure
    drill) down until `scontrol update ... State=RESUME`; 2 returns any DOWN node at once (within
    milliseconds here, so no drill can be run); 0 never (a not-responding node stays DOWN too).
    """
    if return_to_service not in (0, 1, 2):
        raise ValueError(f"return_to_service={return_to_service}: slurm.conf's ReturnToService is 0, 1 or 2")
    host = socket.gethostname().split(".")[0]
    lines = [
        "ClusterName=vqdlocal",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire=10: a requeued job may start again after 10 s instead of ≈120 s
        f"AuthInfo=socket={root}/munge/munge.socket.2,cred_expire=10",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",  # %n: one spool per emulated node (multiple-slurmd)
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd.%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd.%n.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        # no cgroups in this container: track processes by parent pid, no task binding
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "MpiDefault=none",
        f"ReturnToService={return_to_service}",
        # declare more CPUs than the machine has, so 2 nodes x several tasks fit on 2 cores
        "SlurmdParameters=config_overrides",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1,bf_interval=1",
        "DependencyParameters=kill_invalid_depend",
        "JobRequeue=1",
        "KillWait=30",  # SLURM's default: time from SIGTERM to SIGKILL (a cancelled job's ranks save in it)
        "MinJobAge=600",  # keep finished jobs visible to `scontrol show job` for the tests
        "InactiveLimit=0",
        "SlurmdTimeout=60",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        # without slurmdbd, this file is the only record of how a purged job ended
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={root}/log/jobcomp.txt",
    ]
    for name, port in zip(nodes, node_ports):
        lines.append(f"NodeName={name} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} State=UNKNOWN")
    lines.append(f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def _add_hosts_line(nodes: list[str], root: Path) -> str:
    """Append `127.0.0.1 node1 node2` to /etc/hosts (in place: it may be a bind mount)."""
    line = f"127.0.0.1 {' '.join(nodes)} {HOSTS_MARK} {root}"
    text = HOSTS_FILE.read_text()
    if line not in text.splitlines():
        with HOSTS_FILE.open("a") as f:
            f.write(("" if text.endswith("\n") or not text else "\n") + line + "\n")
    return line


def _remove_hosts_line(line: str) -> None:
    text = HOSTS_FILE.read_text()
    kept = [ln for ln in text.splitlines() if ln != line]
    if len(kept) != len(text.splitlines()):
        with HOSTS_FILE.open("r+") as f:  # rewrite in place rather than replace the (mounted) file
            f.seek(0)
            f.write("\n".join(kept) + "\n")
            f.truncate()


class LocalSlurm:
    """One local cluster in `root`; `start()` then `env` for client commands; `stop()` ends its daemons."""

    def __init__(self, root: str | Path, num_nodes: int = 2, cpus: int = 4, return_to_service: int = 1):
        self.root = Path(root).resolve()
        self.nodes = [f"node{i + 1}" for i in range(num_nodes)]
        self.cpus = cpus
        self.return_to_service = return_to_service
        self.conf = self.root / "slurm.conf"
        self.pids: dict[str, int] = {}
        self.hosts_line: str | None = None

    @property
    def env(self) -> dict:
        """Environment for sbatch/squeue/scontrol (and the jobs they start) against this cluster."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        # own session: a Ctrl-C in the test runner must not kill the daemons before stop() runs
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.pids[name] = p.pid
        self._save_pids()

    def _save_pids(self) -> None:
        (self.root / "pids.json").write_text(json.dumps({"pids": self.pids, "hosts_line": self.hosts_line}))

    def start(self, timeout: float = 30.0) -> "LocalSlurm":
        """Install if needed, write the config, start munged, slurmctld and one slurmd per node."""
        ensure_installed()
        for d in ("munge", "state", "run", "log", *(f"spool/{n}" for n in self.nodes)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        ports = [_free_port() for _ in range(1 + len(self.nodes))]
        self.conf.write_text(render_conf(self.root, self.nodes, self.cpus, ports[0], ports[1:],
                                         self.return_to_service))
        self.hosts_line = _add_hosts_line(self.nodes, self.root)
        m = self.root / "munge"
        self._spawn("munged", [_sbin("munged"), "-F", "--force", f"--socket={m}/munge.socket.2",
                               f"--key-file={key}", f"--pid-file={m}/munged.pid",
                               f"--seed-file={m}/munged.seed", f"--log-file={self.root}/log/munged.log"])
        self._wait_for(lambda: (m / "munge.socket.2").exists(), 10, "munged socket")
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for n in self.nodes:
            self._spawn(f"slurmd.{n}", [_sbin("slurmd"), "-D", "-N", n, "-f", str(self.conf)])
        self._wait_for(self._nodes_idle, timeout, "all nodes idle in sinfo")
        return self

    def _nodes_idle(self) -> bool:
        for name, pid in self.pids.items():
            if not _alive(pid):
                raise SlurmSetupError(f"{name} (pid {pid}) died while starting; see {self.root}/log/")
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
        states = dict(ln.split() for ln in r.stdout.splitlines() if ln.strip())
        return r.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes)

    def _wait_for(self, cond, timeout: float, what: str) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if cond():
                return
            time.sleep(0.2)
        raise SlurmSetupError(f"timed out after {timeout:.0f} s waiting for {what}; logs:\n{self.log_tail()}")

    def log_tail(self, n: int = 15) -> str:
        """Last lines of every daemon log (for error messages)."""
        out = []
        for p in sorted((self.root / "log").glob("*")):
            lines = p.read_text(errors="replace").splitlines()[-n:]
            out.append(f"--- {p.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel our jobs, SIGTERM exactly the daemons we started (SIGKILL after `timeout`), end any
        job process they left behind, then restore /etc/hosts."""
        if self.pids.get("slurmctld") and _alive(self.pids["slurmctld"]):
            self._cancel_jobs(timeout=30.0)
        order = [k for k in self.pids if k.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            pid = self.pids.get(name)
            if pid and _alive(pid):
                os.kill(pid, signal.SIGTERM)
        end = time.time() + timeout
        for name in order:
            pid = self.pids.get(name)
            while pid and _alive(pid) and time.time() < end:
                time.sleep(0.1)
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._end_job_processes(timeout)
        if self.hosts_line:
            _remove_hosts_line(self.hosts_line)
        self.pids = {}
        self._save_pids()

    def _cancel_jobs(self, timeout: float) -> None:
        """scancel every job of this cluster and wait until the queue is empty (steps reaped)."""
        def queued() -> list[str]:
            r = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True, timeout=30)
            return r.stdout.split() if r.returncode == 0 else []
        ids = queued()
        if ids:
            subprocess.run(["scancel", *ids], env=self.env, capture_output=True, timeout=30)
        end = time.time() + timeout
        while queued() and time.time() < end:
            time.sleep(0.5)

    def _end_job_processes(self, timeout: float) -> None:
        """slurmstepd and job processes of *this* cluster that outlived its daemons (they carry our
        SLURM_CONF and, for job processes, a SLURM_JOB_ID; a login shell with SLURM_CONF has none)."""
        mine = f"SLURM_CONF={self.conf}".encode()
        left = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                env = (d / "environ").read_bytes().split(b"\0")
                comm = (d / "comm").read_text().strip()
            except OSError:
                continue
            if mine in env and (comm == "slurmstepd" or any(e.startswith(b"SLURM_JOB_ID=") for e in env)):
                left.append(int(d.name))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            end = time.time() + timeout
            while any(_alive(p) for p in left) and time.time() < end:
                time.sleep(0.1)

    @classmethod
    def attach(cls, root: str | Path) -> "LocalSlurm":
        """The cluster a previous `start` left in `root` (for the `stop` command)."""
        c = cls(root)
        saved = json.loads((c.root / "pids.json").read_text())
        c.pids, c.hosts_line = saved["pids"], saved["hosts_line"]
        return c


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap our own zombie children
        if done:
            return False
    except ChildProcessError:
        pass  # not our child (CLI `stop` from another process)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie nobody reaps (orphans under some container inits) is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["start", "stop"])
    ap.add_argument("--dir", required=True, help="directory holding the cluster's config, state and logs")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=4, help="CPUs declared per emulated node")
    ap.add_argument("--return-to-service", type=int, choices=[0, 1, 2], default=1,
                    help="slurm.conf ReturnToService: 1 keeps a node set DOWN by hand down until RESUME "
                         "(node-failure drills), 2 returns it at once")
    a = ap.parse_args(argv)
    if a.action == "start":
        c = LocalSlurm(a.dir, a.nodes, a.cpus, a.return_to_service).start()
        print(f"export SLURM_CONF={c.conf}")
    else:
        LocalSlurm.attach(a.dir).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
