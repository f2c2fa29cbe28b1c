"""The slurm/*.sbatch scripts, submitted to a real Slurm scheduler that these tests start.

A session fixture installs Slurm and MUNGE from Debian when they are absent (needs root), writes a
one-node cluster with the course cluster's partitions (thin_course: CPU, the default; gpu_course:
fake GPUs) and two more for preemption (preemptible, urgent: partition_prio, PreemptMode=REQUEUE),
starts munged, slurmctld and slurmd, and stops them by PID at the end. If the scheduler cannot
start, the tests fail with the reason.

The jobs run the real scripts on a temporary git copy of this repo (tiny data, CPU training, one
thread), with a bare git origin and a local DVC remote and shared cache, as a user on the cluster
would have. One flow, timed to stay short, checks:
  - prepare_data: data prepared, pushed, dvc.lock copied back;
  - repro_gpu under a two-minute limit with --signal=B:USR1@115: the signal comes, the training
    checkpoints and exits 75, the job requeues itself, resumes, finishes; its model is
    byte-identical to an uninterrupted run of the same params (a sweep task);
  - SIGTERM while training, by `scancel --signal=TERM --full`, by `--batch`, by preemption and by a
    plain `scancel` (then a resubmission under the job's key): the checkpoint outlives the run in
    the job's state directory, the job is requeued (by itself, or by Slurm) and resumes; model,
    metrics and DVCLive rows are byte-identical to an uninterrupted twin's;
  - sweep_array: every grid line becomes an experiment in `dvc exp show` after `dvc exp pull`;
    a task beyond the grid fails with a message;
  - exp_gpu: one named experiment; benchmark_cpu/gpu: one throughput-table row per partition.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pcam.checkpoint import load_checkpoint, save_checkpoint
from tests.e2e import TINY, copy_repo, dvc, env, free_port, run, stop_process

pytestmark = pytest.mark.slurm

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SBIN = "/usr/sbin:/sbin"
CPU, GPU = "thin_course", "gpu_course"
# Preemption: a job in URGENT (higher PriorityTier) requeues one in PREEMPTIBLE that holds the
# CPUs it needs; the course partitions are never preempted. GraceTime stays 0 (Slurm's default):
# a grace only delays the end, and slurmctld ends it on its 30-s timer, which would make the test
# depend on the training's speed. (During a grace, Slurm 22.05 signals job steps only: a batch
# job without srun steps gets nothing before the SIGTERM that ends it, as without a grace.)
PREEMPTIBLE, URGENT = "preemptible", "urgent"
N_CPUS = 64
# The preemptible job and the urgent one each take 40: the urgent one fits only by preempting the
# other, and then fits beside the other jobs of the flow (at most ~15 CPUs, one each).
PREEMPT_CPUS = 40
# scancel arguments of the ways a SIGTERM stops a job; "preempted": by a job in URGENT.
STOP_WAYS = {
    "term_full": ["--signal=TERM", "--full"],  # the batch shell and all its processes
    "term_batch": ["--signal=TERM", "--batch"],  # the batch shell alone
    "preempted": [],
    "cancelled": [],  # a plain scancel: SIGTERM to all, the job ends for good
}
# Their uninterrupted twin, an experiment; fewer epochs than EPOCHS: five trainings fewer to run.
STOP_TWIN, STOP_EPOCHS = "stop-twin", 20
N_GPUS = 16  # fake ones: enough for every GPU job of the flow at once
# Long enough that training still runs when the time-limit signal comes (the first scheduler
# check after the job starts: within 30 s), short enough to keep the flow near two minutes.
EPOCHS = 60
PROFILE = TINY | {"train.epochs": EPOCHS, "train.threads": 1, "benchmark.threads": 1}
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def _which(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{SBIN}")


def _apt_install() -> None:
    """Installs Slurm 22.05 + MUNGE (Debian bookworm) when absent; seconds when apt lists exist."""
    if os.geteuid() != 0:
        # The daemons need root too (slurmd runs jobs as their users; munged runs as munge).
        pytest.fail(
            "the Slurm tests install and start a Slurm cluster and need root (CI runs as root); "
            "elsewhere deselect them: pytest -m 'not slurm'"
        )
    if all(_which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    apt_env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(cmd, env=apt_env, capture_output=True).returncode != 0:
        # Fresh machines have no package lists yet.
        subprocess.run(["apt-get", "update"], env=apt_env, capture_output=True)
        proc = subprocess.run(cmd, env=apt_env, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"could not install Slurm ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")


def _die_with_us() -> None:
    """Runs in a daemon's process before exec: SIGTERM it if this test process dies first."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else f"({path} missing)"


@dataclass
class Job:
    """One line of `scontrol show job -o`: a job, or one task of an array job."""

    job_id: str
    state: str
    reason: str
    restarts: int
    exit_code: str
    stdout: str
    array_task: str | None
    array_job: str | None

    @classmethod
    def parse(cls, line: str) -> Job:
        def get(key: str) -> str | None:
            m = re.search(rf"(?:^| ){key}=(\S*)", line)
            return m.group(1) if m else None

        return cls(
            get("JobId") or "",
            get("JobState") or "",
            get("Reason") or "",
            int(get("Restarts") or 0),
            get("ExitCode") or "",
            get("StdOut") or "",
            get("ArrayTaskId"),
            get("ArrayJobId"),
        )

    @property
    def done(self) -> bool:
        # A dependency on a failed job is never satisfied: that job would wait forever.
        return self.state in FINAL_STATES or self.reason == "DependencyNeverSatisfied"

    def log(self) -> str:
        return Path(self.stdout).read_text(errors="replace") if Path(self.stdout).is_file() else ""


@dataclass
class Cluster:
    """A one-node Slurm cluster in `root`: config, state, spool, logs, MUNGE key and socket."""

    root: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        e = env() | {"SLURM_CONF": str(self.conf), "PCAM_VENV": sys.prefix}
        e["PATH"] = f"{e['PATH']}:{SBIN}"
        return e | extra

    def daemon(self, cmd: list[str]) -> None:
        """Starts `cmd` in the foreground, as a child of this process, stopped by PID in stop()."""
        log = open(self.root / "logs" / "daemons.out", "ab")  # noqa: SIM115 - the daemon's now
        self.procs.append(
            subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=log, preexec_fn=_die_with_us)
        )
        log.close()

    def start(self) -> None:
        r, munge = self.root, self.root / "munge"
        for d in ("state", "spool", "logs", "munge"):
            (r / d).mkdir()
        # munged runs as munge and insists that everyone may traverse to its socket.
        r.chmod(0o755)
        shutil.chown(munge, "munge", "munge")
        munge.chmod(0o711)
        key, socket_path = munge / "munge.key", munge / "munge.sock"
        as_munge = ["runuser", "-u", "munge", "--"]
        if _which("mungekey"):
            create = [_which("mungekey"), "--create", f"--keyfile={key}"]
            subprocess.run(as_munge + create, check=True, capture_output=True)
        else:  # MUNGE < 0.5.14: create-munge-key only writes /etc/munge; any random key will do
            key.write_bytes(os.urandom(1024))
            shutil.chown(key, "munge", "munge")
            key.chmod(0o600)
        self.daemon(
            as_munge
            + [
                _which("munged"),
                "--foreground",
                f"--socket={socket_path}",
                f"--key-file={key}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
            ]
        )
        # Fake GPUs: gres File= must name character devices; these behave like /dev/null.
        for i in range(N_GPUS):
            os.mknod(r / f"gpu{i}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(
            f"""\
ClusterName=pcamtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={socket_path},cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/logs/slurmctld.log
SlurmdLogFile={r}/logs/slurmd.log
PlugStackConfig={r}/plugstack.conf
# No cgroups in a container: track processes by parent PID, bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# Finished jobs in a text file, for `sacct -c`.
JobCompType=jobcomp/filetxt
JobCompLoc={r}/jobcomp.txt
# The node may declare more CPUs than it has, and GPUs it has not.
SlurmdParameters=config_overrides
GresTypes=gpu
MpiDefault=none
ReturnToService=2
# Keep finished jobs in `scontrol show job` for the checks.
MinJobAge=600
# SIGTERM to SIGKILL: Slurm's default (30 s) leaves a stopped job time to checkpoint and say so
# on this shared 2-core machine, too.
KillWait=30
# Pending jobs (requeued ones too) are looked at every 5 s, not 60 s.
SchedulerParameters=sched_interval=5,bf_interval=5
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=pcam-node NodeHostname={host} NodeAddr=127.0.0.1 CPUs={N_CPUS} RealMemory=64000 Gres=gpu:{N_GPUS} State=UNKNOWN
PartitionName={CPU} Nodes=pcam-node Default=YES MaxTime=INFINITE State=UP PreemptMode=OFF
PartitionName={GPU} Nodes=pcam-node MaxTime=INFINITE State=UP PreemptMode=OFF
PartitionName={PREEMPTIBLE} Nodes=pcam-node MaxTime=INFINITE State=UP
PartitionName={URGENT} Nodes=pcam-node MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
"""
        )
        (r / "gres.conf").write_text(f"NodeName=pcam-node Name=gpu File={r}/gpu[0-{N_GPUS - 1}]\n")
        (r / "plugstack.conf").write_text("")
        deadline = time.monotonic() + 30
        while not socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.daemon([_which("slurmctld"), "-D", "-i"])
        self.daemon([_which("slurmd"), "-D", "-N", "pcam-node"])
        while time.monotonic() < deadline:
            out = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout
            if "idle" in out:
                return
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        pytest.fail(
            f"the Slurm node did not come up:\n--- slurmctld.log\n{_tail(r / 'logs/slurmctld.log')}"
            f"\n--- slurmd.log\n{_tail(r / 'logs/slurmd.log')}\n--- daemons\n"
            f"{_tail(r / 'logs/daemons.out')}\n--- munged.log\n{_tail(munge / 'munged.log')}"
        )

    def stop(self) -> None:
        # Jobs first: their processes outlive slurmd.
        if len(self.procs) == 3 and all(p.poll() is None for p in self.procs):
            self.run(["scancel", "--full", "--user=root"], check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.run(["squeue", "-h"], check=False).stdout:
                time.sleep(0.5)
        pid_file = self.root / "munge" / "munged.pid"
        for p in reversed(self.procs):  # slurmd, slurmctld, munged
            if p is self.procs[0] and pid_file.is_file():
                # munged itself; runuser then reaps it and exits. (runuser, signalled, would pass
                # the signal on only after two seconds.)
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text()), signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            else:
                stop_process(p, timeout_s=15)

    def run(self, cmd: list[str], check: bool = True, **extra) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env(**extra), capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def sbatch(self, repo: Path, script: str, *args: str, options=(), **extra: str) -> str:
        """Submits slurm/SCRIPT from `repo`, as a user would: `sbatch [options] script args`."""
        cmd = ["sbatch", "--parsable", "--cpus-per-task=1", *options, f"slurm/{script}", *args]
        proc = subprocess.run(cmd, cwd=repo, env=self.env(**extra), capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr}"
        return proc.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[Job]:
        """The job, or every task of an array job."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return [Job.parse(line) for line in out.splitlines() if line.strip()]

    def wait(self, job_ids: list[str], timeout_s: float, on_poll=None) -> dict[str, list[Job]]:
        # `sbatch --wait` polls slowly (and blocks one job at a time): poll scontrol instead.
        deadline = time.monotonic() + timeout_s
        while True:
            # One scontrol call for all jobs: a poll stays well under a second.
            out = self.run(["scontrol", "show", "job", "-o"]).stdout
            every = [Job.parse(line) for line in out.splitlines() if "JobId=" in line]
            jobs = {j: [t for t in every if j in (t.job_id, t.array_job)] for j in job_ids}
            if on_poll is not None:
                on_poll(jobs)
            if all(t.done for tasks in jobs.values() for t in tasks):
                return jobs
            if time.monotonic() > deadline:
                raise AssertionError(f"jobs not finished after {timeout_s} s: {jobs}")
            time.sleep(1)


@pytest.fixture(scope="session")
def slurm():
    _apt_install()
    # Not under pytest's (or $TMPDIR's) private directory: munged must traverse the path.
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="pcam-slurm-", dir="/tmp")))
    try:
        cluster.start()
        _DAEMON_LOGS.append(cluster.root / "logs")
        yield cluster
    finally:
        _DAEMON_LOGS.clear()
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


def model_md5(lock_text: str) -> str:
    outs = yaml.safe_load(lock_text)["stages"]["train"]["outs"]
    return next(o["md5"] for o in outs if o["path"] == "models/model.pt")


def assert_completed(job: Job) -> None:
    assert job.state == "COMPLETED", (
        f"job {job.job_id}: {job.state} {job.reason}\n{job.log()[-4000:]}\n"
        f"--- what slurmctld/slurmd logged about it\n{daemon_lines(job.job_id)}"
    )


# The running cluster's log directory (set by the `slurm` fixture), for failure messages: a job
# that fails before its script prints anything is explained only there.
_DAEMON_LOGS: list[Path] = []


def daemon_lines(job_id: str, limit: int = 60) -> str:
    pattern = re.compile(rf"(JobId=|job |StepId=|job_id=){re.escape(job_id.split('_')[0])}\b")
    lines = [
        f"{log.name}: {line}"
        for logs in _DAEMON_LOGS
        for log in (logs / "slurmctld.log", logs / "slurmd.log")
        if log.is_file()
        for line in log.read_text(errors="replace").splitlines()
        if pattern.search(line)
    ]
    return "\n".join(lines[-limit:]) or "(nothing)"


@dataclass
class Stopped:
    """A job stopped mid-training (STOP_TWIN's params), and what the test saw while it was down."""

    name: str  # its experiment's name
    job: Job | None = None
    stopped: bool = False
    # The checkpoint in the job's state directory after its first run had ended (or None).
    checkpoint_between_runs: dict | None = None
    resubmitted: Job | None = None  # the cancelled job, submitted again with PCAM_STATE_KEY


@dataclass
class Flow:
    repo: Path
    cache: Path
    remote: Path
    prepare: Job
    repro: Job
    sweep_id: str
    sweep: list[Job]
    exp: Job
    broken: Job
    bench_cpu: Job
    bench_gpu: Job
    stop_twin: Job  # uninterrupted, the params of the stopped ones
    stopped: dict[str, Stopped]  # by how: term_full, term_batch, preempted, cancelled


def training_runs(job: Job) -> bool:
    """Whether the job's (current) run has finished an epoch and trains on."""
    run_log = job.log().rpartition("restart ")[2]
    return re.search(r"^epoch \d+/\d+:", run_log, re.MULTILINE) is not None


@pytest.fixture(scope="module")
def flow(slurm, tmp_path_factory) -> Flow:
    base = tmp_path_factory.mktemp("slurm")
    repo = copy_repo(base / "repo", PROFILE)
    # The team's git remote, DVC remote and shared DVC cache (README: Running on a SLURM cluster).
    origin, remote, cache = base / "origin.git", base / "remote", base / "cache"
    run(["git", "init", "-q", "--bare", str(origin)], base)
    run(["git", "remote", "add", "origin", str(origin)], repo)
    run(["git", "push", "-q", "origin", "main"], repo)
    remote.mkdir()
    dvc(["remote", "add", "-d", "--local", "storage", str(remote)], repo)
    dvc(["cache", "dir", "--local", str(cache)], repo)
    dvc(["config", "--local", "cache.type", "symlink,hardlink"], repo)
    dvc(["config", "--local", "cache.shared", "group"], repo)
    grid = base / "grid.txt"
    # Line 1: the repro job's params (its uninterrupted twin), only up to `train` to save time.
    # Line 2: other params, the whole pipeline.
    grid.write_text("# a comment\n-S train.seed=0 train\n\n-S train.epochs=2 -S train.lr=0.01\n")
    tmp = base / "tmp"  # the jobs' $TMPDIR: node-local disk on a real cluster
    tmp.mkdir()
    e = {"TMPDIR": str(tmp)}

    # The repro job starts on data nobody prepared yet, so its training starts after ~20 s of
    # data stages; the time-limit signal comes within the first 30 s; the training either is
    # running then or starts after it, and is told to stop as soon as it can checkpoint.
    repro_id = slurm.sbatch(
        repo, "repro_gpu.sbatch", options=["--time=2", "--signal=B:USR1@115"], **e
    )
    prepare_id = slurm.sbatch(repo, "prepare_data.sbatch", **e)
    extended = set()

    def extend_requeued(jobs: dict[str, list[Job]]) -> None:
        # The second run should not hit the tiny test limit again.
        (job,) = jobs[repro_id] if repro_id in jobs else slurm.jobs(repro_id)
        if job.restarts > 0 and job.state == "PENDING" and job.restarts not in extended:
            slurm.run(["scontrol", "update", f"JobId={repro_id}", "TimeLimit=10"])
            extended.add(job.restarts)

    (prepare,) = slurm.wait([prepare_id], 180, extend_requeued)[prepare_id]
    assert_completed(prepare)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "data prepared on the cluster"], repo)
    run(["git", "push", "-q", "origin", "main"], repo)

    sweep_id = slurm.sbatch(
        repo, "sweep_array.sbatch", options=["--array=1-3"], PCAM_GRID=str(grid), **e
    )
    exp_id = slurm.sbatch(
        repo, "exp_gpu.sbatch", "-n", "tiny", "-S", "train.epochs=1", "train", **e
    )
    broken_id = slurm.sbatch(repo, "exp_gpu.sbatch", "-n", "broken", "-S", "train.epochs=0", **e)
    after_repro = [f"--dependency=afterok:{repro_id}"]
    cpu_id = slurm.sbatch(
        repo, "benchmark_cpu.sbatch", "-S", "benchmark.repeats=2", options=after_repro, **e
    )
    gpu_id = slurm.sbatch(repo, "benchmark_gpu.sbatch", options=after_repro, **e)

    # Stopped by SIGTERM while they train, in the four ways SIGTERM comes, and resumed: four
    # twins of one uninterrupted run. The urgent job preempts the preemptible one (and nothing
    # else: the course partitions are not preemptible).
    twin_args = ("-S", "train.seed=0", "-S", f"train.epochs={STOP_EPOCHS}", "train")
    twin_id = slurm.sbatch(repo, "exp_gpu.sbatch", "-n", STOP_TWIN, *twin_args, **e)
    stopped = {how: Stopped(f"stopped-{how}") for how in STOP_WAYS}
    # Each in its own DVC cache: with the shared one, a job whose training (re)starts after a twin
    # finished would take the result from DVC's run-cache instead of resuming. Data comes from the
    # DVC remote (--pull).
    own_cache = {how: e | {"PCAM_DVC_CACHE": str(base / f"cache-{how}")} for how in STOP_WAYS}
    ids: dict[str, str] = {}
    for how, st in stopped.items():
        options = (
            ["-p", PREEMPTIBLE, f"--cpus-per-task={PREEMPT_CPUS}"] if how == "preempted" else []
        )
        ids[how] = slurm.sbatch(
            repo, "exp_gpu.sbatch", "-n", st.name, *twin_args, options=options, **own_cache[how]
        )
    state_dir = repo / "slurm" / "state"
    cancelled = stopped["cancelled"]
    resubmitted: list[str] = []

    def stop_while_training(jobs: dict[str, list[Job]]) -> None:
        extend_requeued(jobs)
        for how, st in stopped.items():
            (job,) = jobs[ids[how]]
            if not st.stopped and job.state == "RUNNING" and training_runs(job):
                st.stopped = True
                if how == "preempted":
                    urgent = [
                        "-p",
                        URGENT,
                        f"--cpus-per-task={PREEMPT_CPUS}",
                        "-o",
                        str(base / "urgent.out"),
                    ]
                    slurm.run(["sbatch", *urgent, "--wrap", "sleep 1"])
                else:
                    slurm.run(["scancel", *STOP_WAYS[how], job.job_id])
            ended = (job.restarts > 0 and job.state == "PENDING") or job.state == "CANCELLED"
            checkpoint = state_dir / job.job_id / "checkpoints" / "train.pt"
            if st.stopped and ended and st.checkpoint_between_runs is None and checkpoint.is_file():
                st.checkpoint_between_runs = load_checkpoint(checkpoint)
        # A cancelled job stays cancelled; submitted again under its key, it resumes.
        (job,) = jobs[ids["cancelled"]]
        if job.state == "CANCELLED" and not resubmitted:
            resubmitted.append(
                slurm.sbatch(
                    repo,
                    "exp_gpu.sbatch",
                    "-n",
                    cancelled.name,
                    *twin_args,
                    PCAM_STATE_KEY=job.job_id,
                    **own_cache["cancelled"],
                )
            )

    all_ids = [repro_id, sweep_id, exp_id, broken_id, cpu_id, gpu_id, twin_id, *ids.values()]
    jobs = slurm.wait(all_ids, 600, stop_while_training)
    for how, st in stopped.items():
        (st.job,) = jobs[ids[how]]
    assert resubmitted, f"job {cancelled.job.job_id} was not cancelled: {cancelled.job}"
    (cancelled.resubmitted,) = slurm.wait(resubmitted, 300)[resubmitted[0]]
    sweep = sorted(jobs[sweep_id], key=lambda j: int(j.array_task or 0))
    return Flow(
        repo,
        cache,
        remote,
        prepare,
        jobs[repro_id][0],
        sweep_id,
        sweep,
        jobs[exp_id][0],
        jobs[broken_id][0],
        jobs[cpu_id][0],
        jobs[gpu_id][0],
        jobs[twin_id][0],
        stopped,
    )


@pytest.fixture(scope="module")
def experiments(flow) -> dict[str, dict]:
    """Experiments in `dvc exp show` of the checkout after `dvc exp pull`, by name."""
    dvc(["exp", "pull", "origin", "--all-commits"], flow.repo)
    show = json.loads(dvc(["exp", "show", "--json"], flow.repo).stdout)
    return {
        e["name"]: e["revs"][0]["data"]
        for commit in show
        for e in commit.get("experiments") or []
        if e.get("name")
    }


def cached(flow: Flow, md5: str) -> Path:
    return flow.cache / "files" / "md5" / md5[:2] / md5[2:]


def exp_file(repo: Path, name: str, path: str) -> str:
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).stdout.split()
    (ref,) = [r for r in refs if r.endswith("/" + name)]
    return run(["git", "show", f"{ref}:{path}"], repo).stdout


def test_prepare_data_pushes_data_and_copies_lock_back(flow):
    assert_completed(flow.prepare)
    lock = yaml.safe_load(run(["git", "show", "HEAD:dvc.lock"], flow.repo).stdout)
    assert {"prepare", "validate-data", "compute-stats"} <= set(lock["stages"])
    log = flow.prepare.log()
    assert "Running stage 'prepare'" in log
    assert re.search(r"copied \d+ changed file\(s\) back to", log)
    assert any(p.is_file() for p in flow.remote.rglob("*")), "nothing was pushed to the DVC remote"


def test_time_limit_signal_checkpoints_requeues_and_resumes_identically(
    flow, experiments, tmp_path
):
    job = flow.repro
    assert_completed(job)
    assert job.restarts >= 1, "the job was never requeued"
    log = job.log()
    first, _, rest = log.partition("restart 1")
    assert "SIGUSR1: asking the training to checkpoint" in first
    assert "forwarded SIGUSR1 to PID" in first
    assert "exited with 75" in first  # the training's "checkpointed, try again later"
    assert "the checkpoint is kept in" in first and f"requeueing job {job.job_id}" in first
    assert_resumed(rest, job.job_id)
    # The final checkpoint (dvc.lock copied back; the model in the shared cache) is finished.
    resumed = load_checkpoint(cached(flow, model_md5((flow.repo / "dvc.lock").read_text())))
    assert resumed["progress"]["finished"] and resumed["progress"]["epoch"] == EPOCHS
    # Equal to the uninterrupted twin (sweep task 1: same params and data), byte for byte but
    # for the provenance record: the twin ran from a later commit, which it records.
    assert_completed(flow.sweep[0])
    lock = exp_file(flow.repo, f"pcam-sweep-{flow.sweep_id}_1", "dvc.lock")
    twin = load_checkpoint(cached(flow, model_md5(lock)))
    assert resumed["provenance"]["params"] == twin["provenance"]["params"]
    for ckpt, name in ((resumed, "resumed.pt"), (twin, "twin.pt")):
        del ckpt["provenance"]
        save_checkpoint(tmp_path / name, ckpt)
    assert (tmp_path / "resumed.pt").read_bytes() == (tmp_path / "twin.pt").read_bytes()
    # A finished job leaves nothing parked.
    assert not (flow.repo / "slurm" / "state" / job.job_id).exists()


def assert_resumed(run_log: str, key: str, epochs: int = EPOCHS) -> None:
    """The log of a run that resumed from the job's checkpoint and trained to the end."""
    checkpoint = f"slurm/state/{key}/checkpoints/train.pt"
    assert "checkpoint found in" in run_log and "PCAM_RESUME=1" in run_log, run_log[-3000:]
    assert re.search(rf"train: resuming from \S*{checkpoint} at epoch \d+, batch \d+", run_log)
    assert f"epoch {epochs}/{epochs}:" in run_log


def train_results(repo: Path, name: str) -> dict[str, str]:
    """What an experiment's training produced: the hashes dvc.lock records for its cached
    outputs (model.pt, dvclive/metrics.json) and the git blobs of metrics/train.json, dvclive/."""
    lock = yaml.safe_load(exp_file(repo, name, "dvc.lock"))
    outs = {o["path"]: o["md5"] for o in lock["stages"]["train"]["outs"]}
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).stdout.split()
    (ref,) = [r for r in refs if r.endswith("/" + name)]
    tree = run(["git", "ls-tree", "-r", ref, "--", "metrics/train.json", "dvclive"], repo).stdout
    blobs = {line.split("\t")[1]: line.split()[2] for line in tree.splitlines()}
    assert "metrics/train.json" in blobs and any(p.startswith("dvclive/") for p in blobs), tree
    return outs | blobs


def assert_twin(flow: Flow, stopped: Stopped) -> None:
    """Stopped, resumed and finished, its training equals the uninterrupted twin's, byte for
    byte: model, metrics, DVCLive's per-step rows; and its state directory is gone."""
    ckpt = stopped.checkpoint_between_runs
    assert ckpt is not None, "no checkpoint in the job's state directory after its first run"
    assert not ckpt["progress"]["finished"] and ckpt["progress"]["step"] > 0
    assert_completed(flow.stop_twin)
    assert train_results(flow.repo, stopped.name) == train_results(flow.repo, STOP_TWIN)
    assert not (flow.repo / "slurm" / "state" / stopped.job.job_id).exists()


@pytest.mark.parametrize("how", ["term_full", "term_batch"])
def test_scancel_sigterm_checkpoints_requeues_and_resumes_identically(flow, experiments, how):
    # scancel --signal=TERM --full: the shell, dvc and the training all get SIGTERM; dvc dies.
    # --batch: the shell alone; the supervisor passes SIGTERM on to the training.
    stopped = flow.stopped[how]
    job = stopped.job
    assert_completed(job)
    assert job.restarts >= 1, f"the job was never requeued\n{job.log()[-4000:]}"
    first, _, rest = job.log().partition("restart 1")
    assert "SIGTERM: asking the training to checkpoint" in first
    assert "train: stopped by SIGTERM" in first
    if how == "term_batch":
        assert "forwarded SIGTERM to PID" in first
    assert f"requeueing job {job.job_id}" in first
    assert_resumed(rest, job.job_id, STOP_EPOCHS)
    assert_twin(flow, stopped)


def test_preemption_requeues_and_resumes_identically(flow, experiments):
    # A job in the urgent partition preempts this one (PreemptMode=REQUEUE): SIGTERM
    # to every process of the job, SIGKILL KillWait s later; Slurm requeues it.
    stopped = flow.stopped["preempted"]
    job = stopped.job
    assert_completed(job)
    assert job.restarts >= 1, f"the job was never preempted\n{job.log()[-4000:]}"
    first, _, rest = job.log().partition("restart 1")
    assert "DUE TO PREEMPTION" in first
    assert "train: stopped by SIGTERM" in first
    assert f"Slurm requeues job {job.job_id} itself (preempted)" in first
    assert "scontrol requeue" not in first and "requeueing job" not in first
    assert_resumed(rest, job.job_id, STOP_EPOCHS)
    assert_twin(flow, stopped)


def test_plain_scancel_ends_the_job_and_a_resubmission_resumes(flow, experiments):
    # `scancel JOBID`: the user wants the job gone; the checkpoint stays, and the job resumes
    # when submitted again with PCAM_STATE_KEY=JOBID.
    stopped = flow.stopped["cancelled"]
    job = stopped.job
    assert job.state == "CANCELLED", job
    log = job.log()
    assert "train: stopped by SIGTERM" in log
    assert f"PCAM_STATE_KEY={job.job_id} to resume" in log
    assert "requeueing job" not in log
    assert_completed(stopped.resubmitted)
    assert_resumed(stopped.resubmitted.log(), job.job_id, STOP_EPOCHS)
    assert_twin(flow, stopped)


def test_sweep_array_gives_one_experiment_per_grid_line(flow, experiments):
    ok, beyond = flow.sweep[:2], flow.sweep[2]
    for task in ok:
        assert_completed(task)
    # Task 3 of a two-line grid fails, saying why.
    assert beyond.state == "FAILED"
    assert "has 2 experiment lines: submit with --array=1-2" in beyond.log()
    names = [f"pcam-sweep-{flow.sweep_id}_{i}" for i in (1, 2)]
    assert set(names) <= set(experiments), sorted(experiments)
    train = [experiments[n]["params"]["params.yaml"]["data"]["train"] for n in names]
    assert [(t["seed"], t["epochs"], t["lr"]) for t in train] == [(0, EPOCHS, 0.002), (0, 2, 0.01)]
    # Line 2 ran the pipeline from train on: its experiment carries its own evaluation. (The
    # benchmark times code and architecture, not lr or epochs: it need not run again.)
    for stage in ("train", "evaluate", "slice"):
        assert f"Running stage '{stage}'" in ok[1].log(), stage
    assert "metrics/eval.json" in experiments[names[1]]["metrics"]
    # Finished or refused, no task leaves anything parked.
    assert not list((flow.repo / "slurm" / "state").glob(f"{flow.sweep_id}_*"))


def test_exp_gpu_runs_one_named_experiment(flow, experiments):
    assert_completed(flow.exp)
    assert "tiny" in experiments
    assert experiments["tiny"]["params"]["params.yaml"]["data"]["train"]["epochs"] == 1
    assert "Pushed experiment tiny" in flow.exp.log()


def test_failed_experiment_fails_the_job_and_pushes_finished_stages(flow):
    assert flow.broken.state == "FAILED"
    log = flow.broken.log()
    assert "train.epochs" in log  # the stage's own one-line error
    assert "experiment broken failed" in log
    # dvc push --run-cache: the stages that did finish can be restored elsewhere
    assert "pushing the finished stages" in log
    assert any(p.is_file() for p in (flow.remote / "runs").rglob("*"))


def test_benchmarks_append_one_row_per_partition(flow):
    for job in (flow.bench_cpu, flow.bench_gpu):
        assert_completed(job)
    table = (flow.repo / "slurm" / "logs" / "throughput.md").read_text().splitlines()
    assert table[0].startswith("| partition | node |")
    rows = {r.split("|")[1].strip(" `"): r.split("|") for r in table[2:]}
    assert set(rows) == {CPU, GPU} and len(table) == 4
    assert rows[CPU][6].strip() == flow.bench_cpu.job_id
    assert rows[GPU][6].strip() == flow.bench_gpu.job_id
    for cells in rows.values():
        assert float(cells[4]) > 0  # img/s at batch size 1
    logs = flow.repo / "slurm" / "logs"
    cpu = json.loads((logs / f"benchmark-{CPU}-{flow.bench_cpu.job_id}.json").read_text())
    gpu = json.loads((logs / f"benchmark-{GPU}-{flow.bench_gpu.job_id}.json").read_text())
    # -S benchmark.repeats=2 applied to the CPU job only
    repeats = [m["params"]["benchmark.repeats"] for m in (cpu, gpu)]
    assert repeats == [2, PROFILE["benchmark.repeats"]]
