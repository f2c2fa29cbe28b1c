"""What the slurm/*.sbatch jobs do in Python: `python -m pcam.slurm ACTION` (slurm/common.sh).

`run` supervises the pipeline command. A stop reaches a job in one of three ways:
- `--signal=B:USR1@N` before a time limit, `scancel --signal=TERM --batch`: the batch shell alone.
  It writes the signal's name to the stop file; the supervisor passes the signal on to each process
  of the command that has a handler for it (only the training: SIGUSR1 or SIGTERM would kill dvc),
  also to a training that starts only later.
- `scancel --signal=TERM --full`: every process of the batch step at once.
- preemption (PreemptMode=REQUEUE), a plain `scancel`, a time limit without --signal: SIGTERM to
  every process of the job, SIGKILL KillWait seconds (default 30) later.
In the last two, dvc dies at once while the training finishes its step and its checkpoint. The
supervisor is a child subreaper (PR_SET_CHILD_SUBREAPER): the orphaned training becomes its child,
and it returns only after the training has exited. Without it the batch shell would see dvc gone
and end the job, and Slurm would kill the training in the middle of its checkpoint.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil  # a dependency of DVC's

from pcam.errors import exit_on_user_error

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
POLL_S = 0.2


def log(message: str) -> None:
    """The same line format as common.sh's pcam_log."""
    print(f"[pcam {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler for `sig` (its bit in /proc/PID/status SigCgt)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.MULTILINE)
    return bool(mask) and bool(int(mask.group(1), 16) >> (sig - 1) & 1)


def supervise(cmd: list[str], stop_file: Path) -> int:
    """Run `cmd`; on a stop, signal its processes that handle the signal and wait for them.

    Returns cmd's exit status (128 + N when signal N ended it).
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    received: list[signal.Signals] = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, _frame: received.append(signal.Signals(signum)))
    try:
        child = os.posix_spawnp(cmd[0], cmd, os.environ)
    except OSError as err:
        log(f"ERROR: cannot run {cmd[0]}: {err.strerror}")
        return 127
    status: int | None = None
    stop: signal.Signals | None = None
    told: dict[int, str] = {}  # PID -> command line, of the processes told to stop
    while True:
        if stop is None and received:
            stop = received[0]
        if stop is None and stop_file.is_file():
            stop = signal.Signals[stop_file.read_text().strip() or "SIGUSR1"]
        if stop is not None:
            for proc in psutil.Process().children(recursive=True):
                if proc.pid not in told and catches(proc.pid, stop):
                    try:
                        proc.send_signal(stop)
                    except psutil.Error:  # gone
                        continue
                    try:
                        command = " ".join(proc.cmdline())[:200]
                    except psutil.Error:  # gone since, or not ours to read
                        command = "?"
                    told[proc.pid] = command
                    log(f"forwarded {stop.name} to PID {proc.pid} ({command})")
        # Reap the command and the orphans this subreaper inherits.
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            code = os.waitstatus_to_exitcode(wait_status)
            if pid == child:
                status = 128 - code if code < 0 else code
            elif pid in told:
                log(f"PID {pid} ({told[pid]}) exited with {code}")
        if status is not None and not any(psutil.pid_exists(pid) for pid in told):
            return status
        time.sleep(POLL_S)


def requeue(job_id: str, key: str) -> int:
    """After a stop: a job Slurm lets run on (the stop was a signal only) requeues itself; a
    preempted job is requeued by Slurm already; a cancelled one stays cancelled, its checkpoint
    kept for a resubmission under its key."""
    checkpoints = os.environ.get("PCAM_CHECKPOINT_DIR")
    if checkpoints and any(Path(checkpoints).glob("*.pt")):
        log(f"stopped; the checkpoint is kept in {checkpoints}")
    else:
        log("stopped before training wrote a checkpoint")
    resubmit = f"resubmit with sbatch --export=ALL,PCAM_STATE_KEY={key} to resume"
    if not job_id:
        log(f"ERROR: not a SLURM job: run it again with PCAM_STATE_KEY={key} to resume")
        return 1
    show = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=False
    )
    fields = dict(re.findall(r"(?:^| )(\w+)=(\S*)", show.stdout))
    state = fields.get("JobState", "unknown")
    # Slurm counts a requeue at once, before this run's processes have ended.
    if int(fields.get("Restarts") or 0) > int(os.environ.get("SLURM_RESTART_COUNT") or 0):
        log(f"Slurm requeues job {job_id} itself (preempted); the next run resumes")
        return 0
    if state != "RUNNING":
        # A plain scancel (CANCELLED) or a time limit without --signal: nothing can requeue it.
        log(f"job {job_id} ends ({state}); the checkpoint stays: {resubmit}")
        return 0
    log(f"requeueing job {job_id}; the next run resumes from the checkpoint")
    if subprocess.run(["scontrol", "requeue", job_id], check=False).returncode != 0:
        log(f"ERROR: scontrol requeue failed; {resubmit}")
        return 1
    return 0


def use_cache(cache: str, site_cache: str) -> None:
    """= dvc config --local cache.dir/cache.type/core.site_cache_dir, in one process, not three.

    Copies, not links: the data being read sits on the node's disk. site_cache_dir: DVC's
    per-repository index would otherwise pile up in /var/tmp/dvc, one directory per job.
    """
    from configobj import ConfigObj  # DVC's configuration format, and the library DVC uses

    conf = ConfigObj(".dvc/config.local")
    conf.setdefault("cache", {}).update({"dir": cache, "type": "reflink,copy"})
    conf.setdefault("core", {})["site_cache_dir"] = site_cache
    conf.write()


def check_devices(exp_args: list[str], name: str | None = None) -> int:
    """Fail early when train.devices asks for more GPUs than the job has (a DDP run would fail
    only after loading the data). `exp_args`: the `dvc exp run` arguments (-S may override).
    With `name`, print the experiment's name: its -n/--name, or `name`."""
    from pcam.params import load_params

    exp = argparse.ArgumentParser(add_help=False)  # the `dvc exp run` options read here
    exp.add_argument("-n", "--name", default=name)
    exp.add_argument("-S", "--set-param", action="append", default=[])
    exp_opts = exp.parse_known_args(exp_args)[0]
    train = load_params().train
    devices, device = train.devices, train.device
    for setting in exp_opts.set_param:
        key, _, value = setting.partition("=")
        if key == "train.devices" and value.isdigit():
            devices = int(value)
        elif key == "train.device":
            device = value
    gpus = len([d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()])
    if device != "cpu" and devices > 1 and gpus < devices:
        log(f"ERROR: train.devices={devices} but this job has {gpus} GPU(s): --gpus={devices}")
        return 1
    log(f"train.devices={devices}, train.device={device}, GPUs allocated: {gpus}")
    if name:
        print(exp_opts.name)
    return 0


def copy_back(checkout: Path) -> int:
    """Copy what git sees changed in the working copy (dvc.lock, metrics/, plots/, dvclive/) into
    the checkout, each file atomically, as if the pipeline had run there."""
    from pcam.fileio import write_bytes

    subprocess.run(["git", "add", "--all"], check=True)
    diff = ["git", "diff", "--cached", "--no-renames", "--name-only", "-z", "HEAD"]
    out = subprocess.run(diff, capture_output=True, text=True, check=True).stdout
    paths = [p for p in out.split("\0") if p]
    for path in paths:
        if os.path.lexists(path):
            write_bytes(checkout / path, Path(path).read_bytes())
        else:
            (checkout / path).unlink(missing_ok=True)
    log(
        f"copied {len(paths)} changed file(s) back to {checkout}; "
        "there: 'dvc checkout' (or 'dvc pull'), review, commit dvc.lock"
    )
    return 0


def benchmark_params(args: list[str], path: Path = Path("params.yaml")) -> int:
    """Apply `-S benchmark.KEY=VALUE` pairs to params.yaml; only existing benchmark.* keys: other
    params would change what is being measured. The result must pass the strict loader."""
    import yaml

    from pcam.errors import PcamError
    from pcam.params import load_params

    if not args:
        return 0
    if len(args) % 2 or any(a != "-S" for a in args[::2]):
        log(f"ERROR: benchmark: arguments are -S benchmark.KEY=VALUE pairs, not {' '.join(args)}")
        return 1
    doc = yaml.safe_load(path.read_text())
    for setting in args[1::2]:
        key, _, value = setting.partition("=")
        section, _, leaf = key.partition(".")
        if section != "benchmark" or leaf not in doc["benchmark"] or not value:
            log(f"ERROR: benchmark: -S {setting}: only existing benchmark.* params can be set")
            return 1
        doc["benchmark"][leaf] = yaml.safe_load(value)
    before = path.read_text()
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        load_params(path)
    except PcamError as err:
        path.write_text(before)
        log(f"ERROR: benchmark: {err}")
        return 1
    log(f"benchmark params for this run: {' '.join(args)}")
    return 0


def throughput_row(table: Path, details: Path = Path("metrics/details/benchmark.json")) -> int:
    """Append this job's row to the per-partition throughput table (batch-1 inference on the
    node's fastest device, and the best configuration measured); keep `details` next to it."""
    import fcntl
    import json
    import shutil
    import socket

    m = json.loads(details.read_text())
    # Keys name device, precision, layout and batch size: "cuda_fp32_cl_bs1", "cpu_fp32_nchw_bs8".
    bs1 = {k: v for k, v in m["inference"].items() if k.endswith("_bs1")}
    if not bs1:
        log("ERROR: benchmark: no batch-size-1 measurement; add 1 to benchmark.batch_sizes")
        return 1
    device = "cuda" if any(k.startswith("cuda") for k in bs1) else "cpu"  # on a GPU node, the GPU
    key, row = max(
        ((k, v) for k, v in bs1.items() if k.startswith(device)),
        key=lambda kv: kv[1]["images_per_s"],
    )
    best_key, best = max(m["inference"].items(), key=lambda kv: kv[1]["images_per_s"])
    machine = m.get("machine", {})
    hardware = machine.get("gpu") if device == "cuda" else machine.get("cpu")
    partition, job = os.environ.get("SLURM_JOB_PARTITION"), os.environ.get("SLURM_JOB_ID")
    line = (
        f"| `{partition or 'none'}` "
        f"| {os.environ.get('SLURMD_NODENAME', socket.gethostname())} "
        f"| {device}: {hardware or 'unknown'} "
        f"| {row['images_per_s']:.1f} "
        f"| {best['images_per_s']:.1f} ({best_key}) "
        f"| {job or 'none'} |\n"
    )
    table.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(
        details, table.parent / f"benchmark-{partition or 'local'}-{job or os.getpid()}.json"
    )
    with open(table, "a") as out:
        fcntl.flock(out, fcntl.LOCK_EX)  # jobs on two partitions may finish at the same moment
        if os.fstat(out.fileno()).st_size == 0:
            out.write(
                "| partition | node | device | img/s, batch 1 | best img/s (configuration) | job |\n"
                "| :--- | :--- | :--- | ---: | ---: | :--- |\n"
            )
        out.write(line)
    log(f"throughput ({key}), row appended to {table}: {line.strip()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pcam.slurm", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="run CMD under the stop-signal supervisor")
    run.add_argument("--stop-file", type=Path, required=True)
    run.add_argument("cmd", nargs="+")
    again = sub.add_parser("requeue", help="after a stop: requeue the job, or say why not")
    again.add_argument("job_id", help="empty outside Slurm")
    again.add_argument("key", help="the job's state key (PCAM_STATE_KEY to resume it)")
    cache = sub.add_parser("use-cache", help="the job's DVC cache and site cache")
    cache.add_argument("cache")
    cache.add_argument("site_cache")
    # Arguments given after `--`, as they may start with a dash.
    devices = sub.add_parser("check-devices", help="enough GPUs for train.devices?")
    devices.add_argument("--name", help="default experiment name: print the experiment's")
    devices.add_argument("args", nargs=argparse.REMAINDER, help="-- [DVC EXP RUN ARGS]")
    bench = sub.add_parser("benchmark-params", help="apply -S benchmark.KEY=VALUE to params.yaml")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="-- [-S benchmark.KEY=VALUE ...]")
    sub.add_parser("copy-back", help="changed files to the checkout").add_argument(
        "checkout", type=Path
    )
    row = sub.add_parser("throughput-row", help="append this job's row to the throughput table")
    row.add_argument("table", type=Path)
    args = parser.parse_args(argv)
    rest = getattr(args, "args", [])
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if args.action == "run":
        return supervise(args.cmd, args.stop_file)
    if args.action == "use-cache":
        use_cache(args.cache, args.site_cache)
        return 0
    if args.action == "check-devices":
        return exit_on_user_error(check_devices)(rest, args.name)
    if args.action == "copy-back":
        return copy_back(args.checkout)
    if args.action == "benchmark-params":
        return benchmark_params(rest)
    if args.action == "throughput-row":
        return throughput_row(args.table)
    return requeue(args.job_id, args.key)


if __name__ == "__main__":
    sys.exit(main())
