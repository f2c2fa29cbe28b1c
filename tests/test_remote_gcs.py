"""dvc push / pull and dvc exp push / pull through a real GCS-protocol server (gcp-storage-emulator).

    pytest tests/test_remote_gcs.py            # ~1 min on 2 cores; needs no network

The emulator runs on 127.0.0.1 only, in memory; the repo under test gets a `--local` DVC remote
pointing at it (endpointurl + anonymous login), the same dvc-gs/gcsfs code path as the team bucket.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.e2e import TINY, copy_repo, dvc, free_port, make_cmd, run, stop_process

pytestmark = pytest.mark.e2e

BUCKET = "pcam-test"
PREFIX = "dvc-cache"
STARTUP_TIMEOUT_S = 30


def _http(method: str, url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"{}")


def _wait_until_up(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"emulator exited {proc.returncode}:\n{log.read_text()}")
        try:
            _http("GET", f"{url}/storage/v1/b?project=test")
            return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"emulator not up on {url} after {STARTUP_TIMEOUT_S} s:\n{log.read_text()}"
                )
            time.sleep(0.2)


@pytest.fixture(scope="module")
def gcs_endpoint(tmp_path_factory):
    """A running emulator with one empty bucket; stopped (and reaped) when the module ends."""
    workdir = tmp_path_factory.mktemp("gcs-emulator")
    log = workdir / "emulator.log"
    url = f"http://127.0.0.1:{free_port()}"
    exe = Path(sys.executable).parent / "gcp-storage-emulator"
    cmd = [str(exe), "start", "--host=127.0.0.1", f"--port={url.rsplit(':', 1)[1]}", "--in-memory"]
    # Output to a file, not a pipe: nobody reads a pipe here, and a full one would block it.
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_until_up(proc, url, log)
        _http("POST", f"{url}/storage/v1/b?project=test", {"name": BUCKET})
        with pytest.MonkeyPatch.context() as mp:
            # Otherwise gcsfs probes for hierarchical-namespace buckets over gRPC, which the
            # emulator does not serve: every dvc call would wait 60 s for the probe to time out.
            mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            # Anonymous login is set per remote; no developer key should even be looked at.
            mp.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
            yield url
    finally:
        stop_process(proc, timeout_s=10)


def remote_objects(url: str) -> list[str]:
    listing = _http("GET", f"{url}/storage/v1/b/{BUCKET}/o?prefix={PREFIX}/")
    return [item["name"] for item in listing.get("items", [])]


def use_emulator(
    repo: Path, url: str, name: str = "emu", prefix: str = PREFIX, default: bool = True
) -> None:
    """Add a remote on the emulator (the default one unless told), in .dvc/config.local (never
    committed)."""
    dvc(
        ["remote", "add", "--local", *(["-d"] if default else []), name, f"gs://{BUCKET}/{prefix}"],
        repo,
    )
    dvc(["remote", "modify", "--local", name, "endpointurl", url], repo)
    dvc(["remote", "modify", "--local", name, "allow_anonymous_login", "true"], repo)


def cached_files(repo: Path) -> list[str]:
    """Every file of the cached outputs (not cache: false) of the stages in dvc.lock: what push
    and pull move."""
    defined = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    paths = []
    for name in yaml.safe_load((repo / "dvc.lock").read_text())["stages"]:
        for section in ("outs", "metrics", "plots"):
            for item in defined[name].get(section, []):
                path, opts = (item, None) if isinstance(item, str) else next(iter(item.items()))
                if (opts or {}).get("cache", True):
                    paths.append(repo / path)
    files = []
    for path in paths:
        found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        files += [str(p.relative_to(repo)) for p in found]
    return files


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pushed_repo(tmp_path_factory, gcs_endpoint):
    """A reproduced tiny repo, committed to a bare git origin, its cache pushed to the emulator."""
    root = tmp_path_factory.mktemp("remote")
    origin = root / "origin.git"
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], root)
    repo = copy_repo(root / "repo", TINY)
    use_emulator(repo, gcs_endpoint)
    # Up to evaluate: slice and benchmark write only cache: false files, nothing to push.
    dvc(["repro", "evaluate"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "repro"], repo)
    run(["git", "remote", "add", "origin", str(origin)], repo)
    run(["git", "push", "-q", "origin", "main"], repo)
    dvc(["push"], repo)
    return repo, origin


def fresh_clone(origin: Path, dest: Path, config_from: Path) -> Path:
    """A `git clone` given the same `--local` remote (the .dvc/config.local `use_emulator` wrote)."""
    run(["git", "clone", "-q", "-b", "main", str(origin), str(dest)], dest.parent)
    shutil.copy(config_from / ".dvc" / "config.local", dest / ".dvc" / "config.local")
    return dest


def test_committed_config_names_the_gs_remote_without_making_it_the_default(tmp_path):
    # --project: only the committed .dvc/config, not a developer's config.local
    listed = dvc(["config", "--list", "--project"], REPO).stdout.splitlines()
    config = dict(line.split("=", 1) for line in listed if "=" in line)
    assert config.get("remote.gcs.url", "").startswith("gs://"), config
    # No default in git: a clone without credentials never reaches for the bucket (dvc checkout
    # and dvc exp run would load missing .dir listings from it: minutes offline, tracebacks).
    assert "core.remote" not in config, config
    # One command where credentials are set up makes it the default for push/pull/exp push.
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(REPO), str(clone)], tmp_path)
    dvc(["remote", "default", "--local", "gcs"], clone)
    assert dvc(["remote", "default"], clone).stdout.strip() == "gcs"


def test_pull_in_a_fresh_clone_restores_every_cached_file(pushed_repo, gcs_endpoint, tmp_path):
    repo, origin = pushed_repo
    files = cached_files(repo)
    # data, model and predictions: what the README says is pushed
    for must in ("data/raw", "models/model.pt", "data/predictions", "data/stats.json"):
        assert any(f == must or f.startswith(must + "/") for f in files), (must, files)
    assert remote_objects(gcs_endpoint), "dvc push stored nothing in the emulator"

    clone = fresh_clone(origin, tmp_path / "clone", repo)
    assert not (clone / "models/model.pt").exists()
    assert not (clone / ".dvc/cache").exists()  # whatever appears comes from the emulator
    dvc(["pull"], clone)
    for rel in files:
        assert (clone / rel).is_file(), f"not pulled: {rel}"
        assert md5(clone / rel) == md5(repo / rel), f"differs after pull: {rel}"
    assert json.loads(dvc(["status", "--json", "--with-deps", "evaluate"], clone).stdout) == {}


def test_experiment_push_pull_apply_restores_its_model(pushed_repo, gcs_endpoint, tmp_path):
    repo, origin = pushed_repo
    baseline_md5 = md5(repo / "models/model.pt")
    # Only up to `train`: its model is what must travel; evaluate & co. add time, not coverage.
    dvc(["exp", "run", "-n", "lr-remote", "-S", "train.lr=0.01", "train"], repo)
    exp_md5 = md5(repo / "models/model.pt")
    assert exp_md5 != baseline_md5
    before = set(remote_objects(gcs_endpoint))
    dvc(["exp", "push", "origin", "lr-remote"], repo)
    assert set(remote_objects(gcs_endpoint)) - before, "exp push uploaded no new object"

    clone = fresh_clone(origin, tmp_path / "clone", repo)
    dvc(["exp", "pull", "origin", "lr-remote"], clone)
    assert "lr-remote" in dvc(["exp", "list"], clone).stdout
    dvc(["exp", "apply", "lr-remote"], clone)
    assert md5(clone / "models/model.pt") == exp_md5
    assert "lr: 0.01" in (clone / "params.yaml").read_text()


def remote_check(repo: Path, *make_args: str) -> subprocess.CompletedProcess:
    return run([*make_cmd(repo), "remote-check", *make_args], repo, check=False)


def test_remote_check_names_what_was_never_pushed(pushed_repo, gcs_endpoint, tmp_path):
    repo, origin = pushed_repo
    # A second, empty place on the emulator that gets only prepare's outputs (data/raw).
    use_emulator(repo, gcs_endpoint, name="partial", prefix="partial-cache", default=False)
    dvc(["push", "-r", "partial", "prepare"], repo)
    clone = fresh_clone(origin, tmp_path / "clone", repo)  # no data, no DVC cache

    out = remote_check(clone, "REMOTE=partial")
    assert out.returncode != 0, out.stdout + out.stderr
    missing = [ln for ln in out.stdout.splitlines() if ln.startswith("not in remote 'partial': ")]
    named = {ln.split(": ", 1)[1].split(" (")[0] for ln in missing}
    assert {"models/model.pt", "data/stats.json", "models/threshold.json"} <= named, missing
    # A directory output whose .dir listing is neither here nor on that remote: named as a whole.
    assert "data/predictions/" in named, missing
    # Cached on purpose (so validate-data and train are run-cached): the details reports and
    # DVCLive's summary. Every other metric and plot lives in git, never in the remote.
    cached_reports = {
        "metrics/details/data.json",
        "metrics/details/train.json",
        "dvclive/metrics.json",
    }
    assert not any(
        p.startswith(("data/raw", "plots/", "dvclive/plots"))
        or (p.startswith("metrics/") and p not in cached_reports)
        for p in named
    ), missing
    assert out.stdout.splitlines()[-1].startswith(f"remote-check: {len(missing)} cached file(s) ")

    # --all-commits: what the commit names, whatever experiment the workspace holds now.
    dvc(["push", "-r", "partial", "--all-commits"], repo)
    out = remote_check(clone, "REMOTE=partial")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "remote-check: every cached output in dvc.lock is in remote 'partial'" in out.stdout
    # The default remote (everything pushed by the fixture) passes too.
    out = remote_check(clone)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "in remote 'emu'" in out.stdout

    # One file of a directory output lost from the remote, its .dir listing still there: named
    # by itself (`dvc status --cloud` would count it as present along with its directory).
    digest = md5(repo / "data/predictions/test.npz")
    name = f"partial-cache/files/md5/{digest[:2]}/{digest[2:]}"
    _http("DELETE", f"{gcs_endpoint}/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}")
    out = remote_check(clone, "REMOTE=partial")
    assert out.returncode != 0, out.stdout + out.stderr
    assert [ln for ln in out.stdout.splitlines() if ln.startswith("not in remote")] == [
        "not in remote 'partial': data/predictions/test.npz (not in the local cache either)"
    ]


def test_remote_check_without_a_default_remote_says_how_to_set_one(tmp_path):
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(REPO), str(clone)], tmp_path)
    out = remote_check(clone)
    assert out.returncode != 0
    assert "remote-check: no default DVC remote: `dvc remote default --local gcs`" in out.stderr
    assert "Traceback" not in out.stderr


def test_pushed_run_cache_restores_an_uncommitted_experiment_in_a_fresh_clone(
    pushed_repo, gcs_endpoint, tmp_path
):
    """An experiment nobody committed or `exp push`ed: after `python -m pcam.runcache push`, a
    teammate's `dvc pull --run-cache` and the same `dvc exp run --pull` restore train, not rerun it."""
    repo, origin = pushed_repo
    dvc(["exp", "run", "-S", "train.lr=0.005", "train"], repo)
    trained = {rel: md5(repo / rel) for rel in ("models/model.pt", "metrics/train.json")}
    metrics_object = f"{PREFIX}/files/md5/{trained['metrics/train.json'][:2]}/"
    metrics_object += trained["metrics/train.json"][2:]
    dvc(["push", "--run-cache"], repo)
    assert any(name.startswith(f"{PREFIX}/runs/") for name in remote_objects(gcs_endpoint))
    # Why pcam.runcache: DVC pushed the run records, not the cache: false metrics they name.
    assert metrics_object not in remote_objects(gcs_endpoint)
    out = run([sys.executable, "-m", "pcam.runcache", "push"], repo)
    assert "run records pushed" in out.stdout, out.stdout
    assert metrics_object in remote_objects(gcs_endpoint)

    clone = fresh_clone(origin, tmp_path / "clone", repo)
    dvc(["pull", "--run-cache"], clone)
    start = time.monotonic()
    out = dvc(["exp", "run", "--pull", "-S", "train.lr=0.005", "train"], clone)
    print(
        f"fresh clone: train restored from the pushed run-cache in {time.monotonic() - start:.1f} s"
    )
    assert "Stage 'train' is cached - skipping run, checking out outputs" in out.stdout, out.stdout
    assert "epoch 1/" not in out.stdout + out.stderr
    assert {rel: md5(clone / rel) for rel in trained} == trained
