# shellcheck shell=bash
# Shared logic of the slurm/*.sbatch scripts; they source it, it is never run on its own.
#
# What a job gets from it:
#   - strict mode (set -euo pipefail), one log format, the virtual environment;
#   - a private working copy (pcam_workspace): a git clone in node-local $TMPDIR that uses the
#     checkout's DVC cache and remotes. Parallel jobs therefore never share DVC's repository lock,
#     and training reads real copies of the data on local disk (cache.type reflink,copy);
#   - the stop protocol (pcam_run + pcam_requeue_if_interrupted): SIGUSR1 before a time limit
#     (`--signal=B:USR1@N`) or SIGTERM (preemption, scancel) makes the training checkpoint and
#     exit 75. The checkpoint is written straight to the job's state directory on shared
#     storage ($PCAM_CHECKPOINT_DIR), so it outlives the job's node-local working copy. The job
#     requeues itself (a preempted job is requeued by Slurm); the next run resumes from the
#     checkpoint with PCAM_RESUME=1, to a byte-identical result. Who gets which signal, and why
#     a supervisor runs the pipeline command: src/pcam/slurm.py.
#
# Settings, all optional environment variables (sbatch passes the submitting shell's environment):
#   PCAM_REPO        the checkout jobs start from (default: the directory sbatch was run in)
#   PCAM_VENV        virtual environment to activate (default: $PCAM_REPO/.venv)
#   PCAM_MODULES     modules to `module load` before that, e.g. "2023 Python/3.11.3-GCCcore-12.3.0"
#   PCAM_REV         commit that experiments start from (default: the checkout's HEAD)
#   PCAM_GIT_REMOTE  git remote (name of one of the checkout's remotes, or a path/URL) that
#                    experiments are pushed to (default: origin)
#   PCAM_DVC_PUSH    1 (default) pushes outputs to the default DVC remote; 0 leaves them in the
#                    DVC cache only (compute nodes without internet, with a shared cache)
#   PCAM_DVC_CACHE   DVC cache the job uses (default: the checkout's `dvc cache dir`); a job with
#                    its own cache neither takes stage results from nor leaves them to the others
#                    (DVC's run-cache lives in the cache)
#   PCAM_STATE_DIR   shared directory for the jobs' checkpoints (default: $PCAM_REPO/slurm/state)
#   PCAM_STATE_KEY   resume what an earlier job left (cancelled, or not requeueable): its job id
#                    (array task: JOBID_TASKID)
#   PCAM_KEEP_WORK   1 keeps the job's working copy after the job, for debugging

set -euo pipefail

pcam_log() { printf '[pcam %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
pcam_die() {
	pcam_log "ERROR: $*"
	exit 1
}

PCAM_REPO=$(cd "${PCAM_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}" && pwd -P)
if [[ ! -f $PCAM_REPO/dvc.yaml ]] || ! git -C "$PCAM_REPO" rev-parse --git-dir >/dev/null 2>&1; then
	pcam_die "$PCAM_REPO is not a pcam-pipeline checkout: run sbatch from its root or set PCAM_REPO"
fi
# The key of a job's state directory (its checkpoint). A requeued job keeps its id: it finds it again.
PCAM_KEY=${PCAM_STATE_KEY:-${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID:-}}}
PCAM_KEY=${PCAM_KEY:-${SLURM_JOB_ID:-local-$$}}
PCAM_STATE=${PCAM_STATE_DIR:-$PCAM_REPO/slurm/state}/$PCAM_KEY
# The training writes its checkpoint there, on shared storage; `pcam_done` removes it.
export PCAM_CHECKPOINT_DIR=$PCAM_STATE/checkpoints
PCAM_WORK=""
PCAM_STOP=""  # the stop signal's name, once one came: SIGUSR1 (time limit) or SIGTERM
PCAM_TRAPS=0  # counts trapped signals, so pcam_run can tell an interrupted `wait` from a result
# DVC's usage analytics would phone home from every job; unbuffered Python keeps the log in order.
export DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1

# Without a TERM trap, bash would die at once, and the job would end (and Slurm kill the
# training) in the middle of the checkpoint write.
pcam_on_signal() {
	PCAM_TRAPS=$((PCAM_TRAPS + 1))
	[[ -n $PCAM_STOP ]] || pcam_log "$1: asking the training to checkpoint and stop"
	PCAM_STOP=${PCAM_STOP:-$1}
	pcam_tell_stop
}
trap 'pcam_on_signal SIGUSR1' USR1
trap 'pcam_on_signal SIGTERM' TERM

# The supervisor of pcam_run reads the stop from this file (no signal to race its start).
pcam_tell_stop() {
	if [[ -n $PCAM_STOP && -d $PCAM_WORK ]]; then
		echo "$PCAM_STOP" >"$PCAM_WORK/stop" || true
	fi
}

pcam_cleanup() {
	if [[ -n $PCAM_WORK && ${PCAM_KEEP_WORK:-0} != 1 ]]; then
		cd /
		rm -rf "$PCAM_WORK"
	fi
}
trap pcam_cleanup EXIT

# Modules and the venv. Everything after this runs the pinned tools of the venv.
pcam_activate() {
	if [[ -n ${PCAM_MODULES:-} ]]; then
		# Module systems (Lmod, Environment Modules) are not written for `set -u`.
		set +u
		# shellcheck disable=SC2086 # a list of module names, split on purpose
		module load $PCAM_MODULES
		set -u
	fi
	local venv=${PCAM_VENV:-$PCAM_REPO/.venv}
	[[ -f $venv/bin/activate ]] ||
		pcam_die "no virtual environment at $venv: run 'make setup' on a login node, or set PCAM_VENV"
	# shellcheck disable=SC1091 # the venv is created by `make setup`
	source "$venv/bin/activate"
	pcam_log "job ${SLURM_JOB_ID:-none} '${SLURM_JOB_NAME:-}' partition ${SLURM_JOB_PARTITION:-none}" \
		"node ${SLURMD_NODENAME:-$(hostname)} restart ${SLURM_RESTART_COUNT:-0}" \
		"array task ${SLURM_ARRAY_TASK_ID:-none} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}"
	pcam_log "checkout $PCAM_REPO, $(python -V) from $VIRTUAL_ENV"
}

# pcam_workspace commit|worktree
# Makes the job's working copy and cds into it. `commit`: the experiment's start commit
# ($PCAM_REV or HEAD); experiments are recorded relative to a commit, so uncommitted edits are not
# taken along. `worktree`: HEAD plus the checkout's uncommitted changes to tracked files, as
# `dvc repro` in the checkout would see them. The choice is recorded in the state directory, so a
# requeued run works on exactly what the first run worked on, whatever happened in the checkout.
pcam_workspace() {
	local mode=$1 rev
	mkdir -p "$PCAM_STATE"
	if [[ -f $PCAM_STATE/rev ]]; then
		rev=$(<"$PCAM_STATE/rev")
		pcam_log "continuing $PCAM_KEY at $rev (state: $PCAM_STATE)"
	else
		if [[ $mode == worktree ]]; then
			rev=$(git -C "$PCAM_REPO" rev-parse HEAD)
			git -C "$PCAM_REPO" diff --binary HEAD >"$PCAM_STATE/patch"
		else
			rev=$(git -C "$PCAM_REPO" rev-parse "${PCAM_REV:-HEAD}^{commit}")
			if [[ -n $(git -C "$PCAM_REPO" status --porcelain --untracked-files=no) ]]; then
				pcam_log "warning: the checkout has uncommitted changes; the experiment starts from commit $rev without them"
			fi
		fi
		echo "$rev" >"$PCAM_STATE/rev"
	fi
	PCAM_WORK=$(mktemp -d "${TMPDIR:-/tmp}/pcam-$PCAM_KEY.XXXXXX")
	git clone --quiet --no-checkout "$PCAM_REPO" "$PCAM_WORK/repo"
	cd "$PCAM_WORK/repo"
	git checkout --quiet --detach "$rev"
	if [[ -s $PCAM_STATE/patch ]]; then
		git apply --binary "$PCAM_STATE/patch"
		pcam_log "applied the checkout's uncommitted changes: $(git diff --name-only | tr '\n' ' ')"
	fi
	# The clone's origin would be the checkout itself; give it the checkout's own remotes instead,
	# so `dvc exp push origin` goes where the team's experiments are.
	git remote remove origin
	local name
	for name in $(git -C "$PCAM_REPO" remote); do
		git remote add "$name" "$(git -C "$PCAM_REPO" remote get-url "$name")"
	done
	# `dvc exp run` commits; a cluster account often has no git identity configured.
	git config user.name >/dev/null || git config user.name "${USER:-pcam} (slurm)"
	git config user.email >/dev/null || git config user.email "${USER:-pcam}@$(hostname -f 2>/dev/null || hostname)"
	# DVC remotes and credentials usually live in the untracked config.local.
	if [[ -f $PCAM_REPO/.dvc/config.local ]]; then
		cp "$PCAM_REPO/.dvc/config.local" .dvc/config.local
	fi
	# Share the checkout's cache (often a shared project cache): data already there is not pulled
	# again, and what the job produces lands there for `dvc checkout` in the checkout.
	local cache
	cache=${PCAM_DVC_CACHE:-$(cd "$PCAM_REPO" && dvc cache dir)}
	python -m pcam.slurm use-cache "$cache" "$PCAM_WORK/dvc-site-cache"
	# The PCAM download cache (.cache/pcam) is the checkout's, so an interrupted download resumes.
	# A link is not a directory to .gitignore's "/.cache/": exclude it, or git would see it.
	mkdir -p "$PCAM_REPO/.cache"
	ln -sfn "$PCAM_REPO/.cache" .cache
	echo /.cache >>.git/info/exclude
	pcam_log "working copy $PWD at $(git rev-parse --short HEAD), DVC cache $cache"
	if pcam_has_checkpoint; then
		# The training rewrites dvclive/ from the checkpoint itself.
		export PCAM_RESUME=1
		pcam_log "checkpoint found in $PCAM_CHECKPOINT_DIR; training resumes from it (PCAM_RESUME=1)"
	fi
}

pcam_has_checkpoint() {
	compgen -G "$PCAM_CHECKPOINT_DIR/*.pt" >/dev/null
}

# Fails early when train.devices asks for more GPUs than the job has. Arguments: the `dvc exp
# run` arguments, which may override it with -S.
pcam_check_devices() {
	python -m pcam.slurm check-devices -- "$@" || pcam_die "not enough GPUs for train.devices"
}

# pcam_run CMD...: runs CMD under the stop supervisor (src/pcam/slurm.py) and returns its exit
# status. In the background, because bash runs a trap only between foreground commands: `wait`
# returns as soon as a signal arrives, and the trap passes the stop on.
pcam_run() {
	local child status traps
	pcam_tell_stop
	python -m pcam.slurm run --stop-file "$PCAM_WORK/stop" -- "$@" &
	child=$!
	while :; do
		traps=$PCAM_TRAPS
		status=0
		wait "$child" || status=$?
		# A trap during `wait` makes it return 128+signal while CMD still runs; wait again (for a
		# finished CMD, `wait` returns its saved status).
		((traps == PCAM_TRAPS)) && break
	done
	return "$status"
}

# After a failed pipeline command: when the failure is the stop after SIGUSR1/SIGTERM, requeue
# this job (or let Slurm, or say how to resume) and end this run. Otherwise return.
pcam_requeue_if_interrupted() {
	local status=$1
	((status != 0)) && [[ -n $PCAM_STOP ]] || return 0
	if pcam_has_checkpoint; then
		pcam_log "stopped by $PCAM_STOP; the checkpoint is kept in $PCAM_CHECKPOINT_DIR"
	else
		pcam_log "stopped by $PCAM_STOP before training wrote a checkpoint"
	fi
	[[ -n ${SLURM_JOB_ID:-} ]] || pcam_die "not a SLURM job: resume with PCAM_STATE_KEY=$PCAM_KEY"
	# Slurm ends this run right after a requeue (and SIGKILLs it KillWait s after SIGTERM): the
	# working copy goes first.
	pcam_cleanup
	PCAM_WORK=""
	python -m pcam.slurm requeue "$SLURM_JOB_ID" "$PCAM_KEY" || exit 1
	exit 0
}

# pcam_dvc_push [--run-cache]: uploads what the working copy's pipeline produced; with --run-cache
# also the record of every finished stage and every file it names, so that a rerun elsewhere
# restores them instead of recomputing (`dvc push --run-cache` leaves files out: pcam/runcache.py).
pcam_dvc_push() {
	if pcam_has_dvc_remote; then
		dvc push || return
		[[ ${1:-} != --run-cache ]] || python -m pcam.runcache push
	else
		pcam_log "no DVC push (PCAM_DVC_PUSH=0 or no default remote): outputs stay in the DVC cache $(dvc cache dir)"
	fi
}

pcam_has_dvc_remote() {
	[[ ${PCAM_DVC_PUSH:-1} == 1 && -n $(dvc remote default 2>/dev/null) ]]
}

# The job succeeded: its parked state is no longer needed.
pcam_done() {
	rm -rf "$PCAM_STATE"
	pcam_log "done"
}

# Copies what git would see as changed in the working copy (dvc.lock, metrics/, plots/, dvclive/)
# back into the checkout, as if the pipeline had run there. Outputs cached by DVC are not copied:
# they are in the (shared) DVC cache and on the remote, for `dvc checkout` / `dvc pull`.
pcam_copy_back() {
	local status path n=0
	git add --all
	while IFS=$'\t' read -r status path; do
		if [[ $status == D ]]; then
			rm -f "$PCAM_REPO/$path"
		else
			mkdir -p "$(dirname "$PCAM_REPO/$path")"
			cp "$path" "$PCAM_REPO/$path.pcam-tmp"
			mv "$PCAM_REPO/$path.pcam-tmp" "$PCAM_REPO/$path"
		fi
		n=$((n + 1))
	done < <(git diff --cached --no-renames --name-status HEAD)
	git reset --quiet
	pcam_log "copied $n changed file(s) back to $PCAM_REPO; there: 'dvc checkout' (or 'dvc pull'), review, commit dvc.lock"
}

# pcam_experiment ARGS...: one `dvc exp run ARGS` in its own working copy, pushed to the git
# remote as an experiment. Used by exp_gpu.sbatch and sweep_array.sbatch.
pcam_experiment() {
	local name="" arg prev="" remote=${PCAM_GIT_REMOTE:-origin}
	for arg in "$@"; do
		case $prev in -n | --name) name=$arg ;; esac
		case $arg in --name=*) name=${arg#--name=} ;; esac
		prev=$arg
	done
	local extra=()
	if [[ -z $name ]]; then
		name="${SLURM_JOB_NAME:-exp}-$PCAM_KEY"
		extra=(--name "$name")
	fi
	pcam_workspace commit
	if ! git remote | grep -qxF -- "$remote" && [[ $remote != */* && $remote != *:* ]]; then
		pcam_die "git remote '$remote' is not configured in $PCAM_REPO: add it, or set PCAM_GIT_REMOTE to a remote, path or URL"
	fi
	pcam_check_devices "$@"
	pcam_log "experiment $name: dvc exp run --pull --allow-missing $*"
	local status=0
	pcam_run dvc exp run --pull --allow-missing "${extra[@]}" "$@" || status=$?
	pcam_requeue_if_interrupted "$status"
	if ((status != 0)); then
		pcam_log "experiment $name failed (exit $status); pushing the finished stages (run cache)"
		pcam_dvc_push --run-cache || pcam_log "pushing the run-cache failed too"
		pcam_die "experiment $name failed"
	fi
	local no_cache=()
	pcam_has_dvc_remote || no_cache=(--no-cache)
	if ! dvc exp push "${no_cache[@]}" "$remote" "$name"; then
		# The working copy is deleted when the job ends: keep the result in the checkout (its
		# outputs are in the DVC cache), to push from a login node.
		dvc exp push --no-cache "$PCAM_REPO" "$name" || pcam_die "could not save experiment $name"
		pcam_done
		pcam_die "pushing experiment $name to '$remote' failed; it is in $PCAM_REPO: push it from there (dvc exp push origin $name)"
	fi
	pcam_log "experiment $name pushed to '$remote': 'dvc exp pull $remote $name' (or --all-commits) in the checkout, then 'dvc exp show'"
	pcam_done
}

# pcam_benchmark [-S benchmark.KEY=VALUE ...]: the benchmark stage on this node (the checkout's
# code and architecture, freshly initialised) and one row of the per-partition throughput table
# (slurm/logs/throughput.md; the run's metrics/details/benchmark.json is kept next to it). Used by benchmark_{cpu,gpu}.sbatch.
pcam_benchmark() {
	local logs=$PCAM_REPO/slurm/logs
	pcam_workspace worktree
	if (($# > 0)); then
		# Only benchmark.* may change: other params would change what is being measured.
		python -m pcam.slurm benchmark-params -- "$@" || pcam_die "bad benchmark arguments: $*"
		pcam_log "benchmark params for this run: $*"
	fi
	# The data the stage reads (train split, stats), from the DVC cache or the remote.
	dvc pull --with-deps benchmark ||
		pcam_die "could not get the benchmark stage's inputs: run prepare_data.sbatch (it pushes the data) first"
	# --force: an up-to-date benchmark is still measured again, on this node.
	local status=0
	pcam_run dvc repro --force --single-item benchmark || status=$?
	((status == 0)) || pcam_die "the benchmark stage failed (exit $status)"
	mkdir -p "$logs"
	cp metrics/details/benchmark.json "$logs/benchmark-${SLURM_JOB_PARTITION:-local}-${SLURM_JOB_ID:-$$}.json"
	python -m pcam.slurm throughput-row "$logs/throughput.md" || pcam_die "no throughput row"
	pcam_log "row appended to $logs/throughput.md"
	pcam_done
}
