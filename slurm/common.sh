# shellcheck shell=bash
# Sourced by slurm/*.sbatch in a `||` list, so without `set -e` while it loads: those steps check
# themselves. Settings (PCAM_* variables): README, Running on a SLURM cluster.
set -euo pipefail

pcam_log() { printf '[pcam %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
pcam_die() {
	pcam_log "ERROR: $*"
	exit 1
}

cd "${PCAM_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}" || pcam_die "cannot enter ${PCAM_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
PCAM_REPO=$(pwd -P)
[[ -f dvc.yaml ]] && git rev-parse --git-dir >/dev/null 2>&1 ||
	pcam_die "$PCAM_REPO is not a pcam-pipeline checkout: run sbatch from its root or set PCAM_REPO"
# The key of the job's state (its checkpoint): a requeued job keeps its id, and finds it again.
PCAM_KEY=${PCAM_STATE_KEY:-${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local-$$}}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}}
PCAM_STATE=$(realpath -m "${PCAM_STATE_DIR:-slurm/state}/$PCAM_KEY")
# No DVC usage analytics from every job; unbuffered Python keeps the log in order.
export PCAM_CHECKPOINT_DIR=$PCAM_STATE/checkpoints DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1
PCAM_WORK=$(mktemp -d "${TMPDIR:-/tmp}/pcam-$PCAM_KEY.XXXXXX") || pcam_die "cannot create a working directory in ${TMPDIR:-/tmp}"
PCAM_STOP=""  # SIGUSR1 (time limit near) or SIGTERM, once one came
PCAM_TRAPS=0  # lets pcam_run tell a `wait` a trap interrupted from a result

# Without a TERM trap, bash would die at once and Slurm kill the training mid-checkpoint. The
# supervisor reads the stop from a file: no signal can race its start.
pcam_on_signal() {
	PCAM_TRAPS=$((PCAM_TRAPS + 1))
	[[ -n $PCAM_STOP ]] || pcam_log "$1: asking the training to checkpoint and stop"
	PCAM_STOP=${PCAM_STOP:-$1}
	echo "$PCAM_STOP" 2>/dev/null >"$PCAM_WORK/stop" || true
}
trap 'pcam_on_signal SIGUSR1' USR1
trap 'pcam_on_signal SIGTERM' TERM
pcam_cleanup() {
	cd /
	[[ ${PCAM_KEEP_WORK:-0} == 1 ]] || rm -rf "$PCAM_WORK"
}
trap pcam_cleanup EXIT

if [[ -n ${PCAM_MODULES:-} ]]; then
	set +u # module systems (Lmod, Environment Modules) are not written for `set -u`
	# shellcheck disable=SC2086 # a list of module names, split on purpose
	module load $PCAM_MODULES || pcam_die "module load $PCAM_MODULES failed"
	set -u
fi
PCAM_VENV=${PCAM_VENV:-$PCAM_REPO/.venv}
source "$PCAM_VENV/bin/activate" ||
	pcam_die "no virtual environment at $PCAM_VENV: run 'make setup' on a login node, or set PCAM_VENV"
pcam_log "job ${SLURM_JOB_ID:-none} '${SLURM_JOB_NAME:-}' partition ${SLURM_JOB_PARTITION:-none}" \
	"node ${SLURMD_NODENAME:-$(hostname)} restart ${SLURM_RESTART_COUNT:-0} array task ${SLURM_ARRAY_TASK_ID:-none}" \
	"CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}; checkout $PCAM_REPO, $(python -V) from $VIRTUAL_ENV"

# pcam_workspace commit|worktree: clones the checkout to $PCAM_WORK/repo and cds there. commit:
# $PCAM_REV or HEAD (experiments are recorded relative to a commit); worktree: HEAD plus the
# checkout's uncommitted changes to tracked files. A requeued run reuses the first run's choice.
pcam_workspace() {
	local rev=HEAD cache
	[[ $1 == worktree ]] || rev=${PCAM_REV:-HEAD}
	mkdir -p "$PCAM_STATE"
	if [[ ! -f $PCAM_STATE/rev ]]; then
		rev=$(git rev-parse "$rev^{commit}")
		if [[ $1 == worktree ]]; then
			git diff --binary HEAD >"$PCAM_STATE/patch"
		elif [[ -n $(git status --porcelain --untracked-files=no) ]]; then
			pcam_log "warning: the checkout has uncommitted changes; the experiment starts from commit $rev without them"
		fi
		echo "$rev" >"$PCAM_STATE/rev"
	fi
	git clone --quiet --no-checkout "$PCAM_REPO" "$PCAM_WORK/repo"
	cd "$PCAM_WORK/repo"
	git checkout --quiet --detach "$(<"$PCAM_STATE/rev")"
	if [[ -s $PCAM_STATE/patch ]]; then
		git apply --binary "$PCAM_STATE/patch"
		pcam_log "applied the checkout's uncommitted changes: $(git diff --name-only | tr '\n' ' ')"
	fi
	# `dvc exp run` commits; a cluster account often has no git identity configured.
	git config user.name >/dev/null || git config user.name "${USER:-pcam} (slurm)"
	git config user.email >/dev/null || git config user.email "${USER:-pcam}@$(hostname -f 2>/dev/null || hostname)"
	# DVC remotes and credentials usually live in the untracked config.local.
	[[ ! -f $PCAM_REPO/.dvc/config.local ]] || cp "$PCAM_REPO/.dvc/config.local" .dvc/
	cache=${PCAM_DVC_CACHE:-$(cd "$PCAM_REPO" && dvc cache dir)}
	python -m pcam.slurm use-cache "$cache" "$PCAM_WORK/dvc-site-cache"
	# The checkout's download cache: an interrupted download resumes.
	mkdir -p .cache "$PCAM_REPO/.cache/pcam"
	ln -s "$PCAM_REPO/.cache/pcam" .cache/pcam
	pcam_log "working copy $PWD at $(git rev-parse --short HEAD), DVC cache $cache, state $PCAM_STATE"
	if compgen -G "$PCAM_CHECKPOINT_DIR/*.pt" >/dev/null; then
		export PCAM_RESUME=1 # the training rewrites dvclive/ from the checkpoint itself
		pcam_log "checkpoint found in $PCAM_CHECKPOINT_DIR; training resumes from it (PCAM_RESUME=1)"
	fi
}

# pcam_run WHAT CMD...: CMD under the stop supervisor, in the background: bash runs a trap only
# between foreground commands, and a trap makes `wait` return while CMD runs on. After a stop the
# job is requeued (by itself or by Slurm; a cancelled one says how to resume) and this run ends,
# its working copy gone first. After a failure the finished stages are pushed for a rerun.
pcam_run() {
	local what=$1 child status=0 traps=-1
	python -m pcam.slurm run --stop-file "$PCAM_WORK/stop" -- "${@:2}" &
	child=$!
	while ((traps != PCAM_TRAPS)); do
		traps=$PCAM_TRAPS
		status=0
		wait "$child" || status=$?
	done
	if ((status != 0)) && [[ -n $PCAM_STOP ]]; then
		pcam_cleanup
		python -m pcam.slurm requeue "${SLURM_JOB_ID:-}" "$PCAM_KEY"
		exit 0
	elif ((status != 0)); then
		pcam_log "$what failed (exit $status); pushing the finished stages (run cache)"
		pcam_dvc_push --run-cache || pcam_log "pushing the run-cache failed too"
		pcam_die "$what failed"
	fi
}

# pcam_dvc_push [--run-cache]: with --run-cache also each finished stage's record and the files it
# names (`dvc push --run-cache` leaves files out: pcam/runcache.py).
pcam_dvc_push() {
	if [[ ${PCAM_DVC_PUSH:-1} != 1 || -z $(dvc remote default 2>/dev/null) ]]; then
		pcam_log "no DVC push (PCAM_DVC_PUSH=0 or no default remote): outputs stay in the DVC cache $(dvc cache dir)"
	else
		dvc push || return
		[[ ${1:-} != --run-cache ]] || python -m pcam.runcache push
	fi
}

pcam_done() {
	rm -rf "$PCAM_STATE"
	pcam_log "done"
}

# Pushes the outputs, copies the files git sees changed into the checkout, removes the state.
pcam_finish() {
	pcam_dvc_push
	python -m pcam.slurm copy-back "$PCAM_REPO"
	pcam_done
}

# pcam_experiment ARGS...: `dvc exp run ARGS` from a commit, pushed to the git remote.
pcam_experiment() {
	local remote=${PCAM_GIT_REMOTE:-origin} url name
	url=$(git remote get-url --push "$remote" 2>/dev/null) || url=$remote
	[[ $url == */* || $url == *:* ]] ||
		pcam_die "git remote '$remote' is not configured in $PCAM_REPO: add it, or set PCAM_GIT_REMOTE to a remote, path or URL"
	pcam_workspace commit
	name=$(python -m pcam.slurm check-devices --name "${SLURM_JOB_NAME:-exp}-$PCAM_KEY" -- "$@")
	pcam_log "experiment $name: dvc exp run --pull --allow-missing $*"
	pcam_run "experiment $name" dvc exp run --pull --allow-missing --name "$name" "$@"
	if ! pcam_dvc_push || ! dvc exp push --no-cache "$url" "$name"; then
		# The working copy goes when the job ends: keep the result in the checkout.
		dvc exp push --no-cache "$PCAM_REPO" "$name" || pcam_die "could not save experiment $name"
		pcam_done
		pcam_die "pushing experiment $name (outputs: dvc push; then to '$remote') failed; it is in $PCAM_REPO: push it from there (dvc push; dvc exp push origin $name)"
	fi
	pcam_log "experiment $name pushed to '$remote': 'dvc exp pull $remote $name' (or --all-commits) in the checkout, then 'dvc exp show'"
	pcam_done
}

# pcam_benchmark [-S benchmark.KEY=VALUE ...]: the benchmark stage measured again on this node, and
# one row of slurm/logs/throughput.md.
pcam_benchmark() {
	pcam_workspace worktree
	python -m pcam.slurm benchmark-params -- "$@"
	dvc pull --with-deps benchmark ||
		pcam_die "could not get the benchmark stage's inputs: run prepare_data.sbatch (it pushes the data) first"
	pcam_run "the benchmark stage" dvc repro --force --single-item benchmark
	python -m pcam.slurm throughput-row "$PCAM_REPO/slurm/logs/throughput.md"
	pcam_done
}
