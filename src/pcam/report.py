"""Reports from what DVC already records: seed-averaged sweeps, and change reports for pull requests.

    python -m pcam.report experiments [--plot reports/experiments.png] [--out reports/experiments.md]
                                      [--select valid.roc_auc] [--metric KEY ...] [--rev REV]
                                      [--input FILE]
    python -m pcam.report changes [--base main] [--rev REV] [--out reports/changes.md]
                                  [--plots-dir reports/plots] [--html-template FILE]
    make sweep-report / make changes-report        # the same, with the paths above

What the reports hold, and why the champion is the best mean on a *validation* metric among the
experiments only (the baseline commit is shown apart, test metrics never choose): README, "Sweeps
averaged over seeds" and "Change reports for pull requests". A metric KEY is `split.metric` in
metrics/eval.json (`valid.roc_auc`) or `FILE:KEY` for another file
(`metrics/train.json:best_val_loss`); {value, ci_low, ci_high} (older commits' metrics/eval.json)
reads `value`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from pcam.errors import PcamError, exit_on_user_error
from pcam.fileio import write_text
from pcam.lockcheck import (
    DvcFailed,
    dvc_out,
    find_contradictions,
    locked_paths,
    overlaps,
    pipeline_order,
)
from pcam.readme import table

DEFAULT_METRICS_FILE = "metrics/eval.json"
MAIN_METRICS = (
    "valid.roc_auc",
    "valid.f2",
    "test.roc_auc",
    "test.f2",
    "test.sensitivity",
    "test.specificity",
)
DEFAULT_SELECT = "valid.roc_auc"
SEED_PARAM = "train.seed"
PARAMS_FILE = "params.yaml"

# --- dvc exp show --json -> runs
# Not `dvc.api.exp_show`: its flat table names a metric's file only when two files share the key,
# so `FILE:KEY` could not be resolved, and `--input` reads saved `dvc exp show --json` output.


@dataclass(frozen=True)
class Run:
    """One finished pipeline run: a baseline commit or an experiment."""

    name: str
    rev: str
    params: dict[str, Any]  # flattened: "train.lr" (params.yaml) or "other.yaml:key"
    metrics: dict[str, Any]  # metrics file -> its parsed content
    baseline: bool = False  # a commit, not an experiment: never part of the grid


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        return {
            k: v
            for key, value in node.items()
            for k, v in _flatten(value, f"{prefix}{key}.").items()
        }
    # Lists (benchmark.batch_sizes) become tuples so configurations can be dict keys.
    return {prefix[:-1]: tuple(node) if isinstance(node, list) else node}


def _params_key(path: str) -> str:
    return "" if path == PARAMS_FILE else f"{path}:"


def _run_from_rev(entry: dict, name: str, baseline: bool) -> Run | None:
    data = entry.get("data") or {}
    params = {
        _params_key(path) + key: value
        for path, content in (data.get("params") or {}).items()
        for key, value in _flatten((content or {}).get("data") or {}).items()
    }
    metrics = {
        path: content["data"]
        for path, content in (data.get("metrics") or {}).items()
        if content and "data" in content and "error" not in content
    }
    if entry.get("error") or not metrics:
        return None
    return Run(name, entry.get("rev", ""), params, metrics, baseline)


def runs_from_exp_show(doc: list[dict]) -> tuple[list[Run], list[str]]:
    """Finished runs in `dvc exp show --json` output, and a note for every row left out.

    The workspace row is left out: it repeats the baseline or the last experiment run in place.
    Queued, running and failed experiments have no (final) metrics and are left out too. Commits
    come back with `baseline=True`.
    """
    runs: list[Run] = []
    notes: list[str] = []
    for commit in (c for c in doc if c.get("rev") != "workspace"):
        label = commit.get("name") or commit.get("rev", "")[:7]
        if run := _run_from_rev(commit, label, baseline=True):
            runs.append(run)
        else:
            notes.append(f"baseline {label}: no metrics (not reproduced, or unreadable)")
        for exp in commit.get("experiments") or []:
            revs = exp.get("revs") or [{}]
            name = exp.get("name") or revs[0].get("rev", "?")[:7]
            state = (exp.get("executor") or {}).get("state")
            if state in ("queued", "running", "failed"):
                notes.append(f"experiment {name}: {state}")
            elif run := _run_from_rev(revs[0], name, baseline=False):
                runs.append(run)
            else:
                notes.append(f"experiment {name}: no metrics (failed or unreadable)")
    return runs, notes


def _params_json(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def dedupe(runs: list[Run]) -> tuple[list[Run], list[str]]:
    """One run per distinct params: the pipeline is deterministic, so a rerun is not a new sample.

    Counting it twice would shrink the apparent spread and pull the mean towards it (e.g. an
    experiment queued twice with the same lr and seed).
    """
    kept: dict[str, Run] = {}
    notes = []
    for run in runs:
        if (first := kept.setdefault(_params_json(run.params), run)) is not run:
            notes.append(f"{run.name}: same params as {first.name}, counted once")
    return list(kept.values()), notes


def stale_outputs(lock: dict, params: dict[str, Any]) -> set[str]:
    """Outputs in a dvc.lock that do not come from these params and the upstream outputs.

    An experiment run with a target (`dvc exp run -S train.lr=.. train`) keeps its parent's
    dvc.lock entries, and metrics files, for the stages it did not run: those metrics belong to
    another model. A stage is stale when the params it recorded differ from the run's, when
    dvc.lock contradicts itself about one of its dependencies (pcam.lockcheck), or when it reads
    the outputs of a stale stage.
    """
    stages = lock.get("stages") or {}
    stale = {c.consumer for c in find_contradictions(lock)}
    for name, stage in stages.items():
        for path, recorded in (stage.get("params") or {}).items():
            for key, value in (recorded or {}).items():
                value = tuple(value) if isinstance(value, list) else value
                if params.get(_params_key(path) + key, value) != value:
                    stale.add(name)
    stale_outs = set()
    for name in pipeline_order(lock):  # producers first, so staleness flows down in one pass
        deps = locked_paths(stages[name], "deps")
        if name in stale or any(overlaps(d, o) for d in deps for o in stale_outs):
            stale_outs |= locked_paths(stages[name], "outs")
    return stale_outs


def drop_stale_metrics(runs: list[Run], read_lock) -> tuple[list[Run], list[str]]:
    """Runs without the metrics files that `stale_outputs` flags in their own dvc.lock.

    `read_lock(rev)` returns the parsed dvc.lock of that commit, or None when it cannot be read.
    """
    kept, notes = [], []
    for run in runs:
        lock = read_lock(run.rev)
        if lock is None:
            notes.append(f"{run.name}: dvc.lock unreadable at {run.rev[:7]}, staleness not checked")
            kept.append(run)
            continue
        stale = sorted(set(run.metrics) & stale_outputs(lock, run.params))
        if stale:
            notes.append(f"{run.name}: {', '.join(stale)} left out (its stage was not re-run)")
        metrics = {k: v for k, v in run.metrics.items() if k not in stale}
        kept.append(dataclasses.replace(run, metrics=metrics))
    return kept, notes


# --- metrics and aggregation


def split_metric(spec: str) -> tuple[str, str]:
    """`valid.roc_auc` -> (metrics/eval.json, valid.roc_auc); `FILE:KEY` -> (FILE, KEY)."""
    path, _, key = spec.rpartition(":")
    return path or DEFAULT_METRICS_FILE, key


def _lookup(node: Any, dotted: str) -> Any:
    # Keys may hold dots themselves (`val_f2_at_0.5`): try the longest matching key first.
    if not dotted:
        return node
    if not isinstance(node, dict):
        return None
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in node and (found := _lookup(node[key], ".".join(parts[i:]))) is not None:
            return found
    return None


def metric_value(run: Run, spec: str) -> float | None:
    path, key = split_metric(spec)
    value = _lookup(run.metrics.get(path), key)
    if isinstance(value, dict):  # {value, ci_low, ci_high}: older commits' metrics/eval.json
        value = value.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


class Stat(NamedTuple):
    mean: float
    std: float  # sample std (n - 1); nan for a single run
    n: int


def summarize(values: list[float]) -> Stat | None:
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return Stat(statistics.fmean(values), std, len(values))


@dataclass(frozen=True)
class Config:
    """Runs that differ only in the seed."""

    params: dict[str, Any]  # every param except the seed
    runs: tuple[Run, ...]
    seed_param: str

    @property
    def seeds(self) -> list[Any]:
        return sorted((r.params.get(self.seed_param) for r in self.runs), key=str)

    def values(self, spec: str) -> list[float]:
        return [v for r in self.runs if (v := metric_value(r, spec)) is not None]

    def stat(self, spec: str) -> Stat | None:
        return summarize(self.values(spec))


def group_configs(runs: list[Run], seed_param: str = SEED_PARAM) -> list[Config]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(_params_json(_without(run.params, seed_param)), []).append(run)
    return [
        Config(_without(rs[0].params, seed_param), tuple(rs), seed_param) for rs in groups.values()
    ]


def _without(params: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k != key}


def varying_params(configs: list[Config]) -> list[str]:
    """Params whose value differs between configurations: what the sweep is about."""
    keys = sorted({k for c in configs for k in c.params})
    return [k for k in keys if len({repr(c.params.get(k)) for c in configs}) > 1]


def check_select(spec: str) -> None:
    if any(part.startswith("test") for part in split_metric(spec)[1].split(".")):
        raise PcamError(
            f"--select {spec}: the champion must be chosen on a validation metric "
            "(e.g. valid.roc_auc); choosing on test leaks the test split into model selection"
        )


def ranked(configs: list[Config], select: str, lower_is_better: bool = False) -> list[Config]:
    """Best first by the mean of `select`; configurations without it last, in input order."""
    sign = 1 if lower_is_better else -1

    def key(c: Config) -> tuple[bool, float]:
        stat = c.stat(select)
        return (stat is None, sign * stat.mean if stat else 0.0)

    return sorted(configs, key=key)


def champion(configs: list[Config], select: str, lower_is_better: bool = False) -> Config:
    """The first of `ranked`: the best mean of `select` (a validation metric)."""
    check_select(select)
    best = ranked(configs, select, lower_is_better)[0]
    if best.stat(select) is None:
        raise PcamError(f"no run has the metric {select!r} ({split_metric(select)[0]})")
    return best


# --- output


def _fmt_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(map(_fmt_value, value)) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _fmt_stat(stat: Stat | None, n_runs: int | None = None) -> str:
    if stat is None:
        return "–"
    spread = "–" if math.isnan(stat.std) else f"{stat.std:.4f}"
    # Fewer values than runs: some runs lack this metric (stale or missing); say so.
    fewer = f" (n={stat.n})" if n_runs is not None and stat.n != n_runs else ""
    return f"{stat.mean:.4f} ± {spread}{fewer}"


def config_label(config: Config, varying: list[str]) -> str:
    return ", ".join(f"{k}={_fmt_value(config.params.get(k))}" for k in varying) or "(all runs)"


def experiments_markdown(
    configs: list[Config],
    metrics: list[str],
    select: str,
    lower_is_better: bool = False,
    notes: list[str] | None = None,
    baselines: list[Run] | None = None,
) -> str:
    """The grid's table (best first, champion marked), then the baseline commits apart."""
    best = champion(configs, select, lower_is_better)
    varying = varying_params(configs)
    seed_param = configs[0].seed_param
    rows = []
    for c in ranked(configs, select, lower_is_better):  # best first, as champion() picks
        cells = [_fmt_value(c.params.get(k)) for k in varying] or ["(all runs)"]
        if c is best:
            cells[0] = f"**{cells[0]}** (champion)"
        cells += [", ".join(map(_fmt_value, c.seeds)), str(len(c.runs))]
        rows.append(cells + [_fmt_stat(c.stat(m), len(c.runs)) for m in metrics])
    head = [*(varying or ["configuration"]), f"{seed_param} values", "n", *metrics]
    stat = best.stat(select)
    assert stat is not None  # champion() only picks configurations that have it
    lines = [
        f"## Experiments: {len(configs)} configuration(s), {sum(len(c.runs) for c in configs)} "
        f"run(s), mean ± sample std over {seed_param}",
        "",
        *table(head, rows, len(head), spaced=False),
        "",
        f"Champion by {'lowest' if lower_is_better else 'highest'} mean {select} over seeds: "
        f"**{config_label(best, varying)}** ({_fmt_stat(stat)}, n={stat.n}; runs: "
        f"{', '.join(r.name for r in best.runs)}). Test columns are reported, not used to choose.",
    ]
    if baselines:
        shown = [*varying, seed_param]
        lines += [
            "",
            "### Baseline, not part of the grid (one run each; not a champion candidate)",
            "",
        ]
        rows = [
            [r.name, *(_fmt_value(r.params.get(k)) for k in shown)]
            + [f"{v:.4f}" if (v := metric_value(r, m)) is not None else "–" for m in metrics]
            for r in baselines
        ]
        head = ["baseline commit", *shown, *metrics]
        lines += table(head, rows, len(head), spaced=False)
    if len({tuple(map(str, c.seeds)) for c in configs}) > 1:
        lines.append(
            "Warning: configurations were run with different seeds; their means are not "
            "directly comparable."
        )
    if notes:
        lines += ["", "Left out or merged:", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def plot_experiments(
    path: str | os.PathLike,
    configs: list[Config],
    metrics: list[str],
    best: Config,
    baselines: list[Run] | None = None,
) -> None:
    """Each seed as a dot, mean ± std as an error bar, one panel per metric, champion starred;
    each baseline commit as a dashed line, apart from the grid."""
    import matplotlib.pyplot as plt  # after pcam.plots has chosen the Agg backend

    from pcam.plots import save_figure

    varying = varying_params(configs)
    labels = [("★ " if c is best else "") + config_label(c, varying) for c in configs]
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    width = max(4.0, 0.9 * len(configs) + 2.0)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * width, rows * 3.6), squeeze=False)
    for ax in axes.flat[len(metrics) :]:
        ax.axis("off")
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for i, c in enumerate(configs):
            values = c.values(metric)
            ax.plot([i] * len(values), values, "o", color="0.6", ms=4, zorder=1)
            if stat := summarize(values):
                err = 0.0 if math.isnan(stat.std) else stat.std
                ax.errorbar(i, stat.mean, yerr=err, fmt="s", color="C0", capsize=4, zorder=2)
        for k, run in enumerate(baselines or []):
            if (value := metric_value(run, metric)) is not None:
                ax.axhline(value, color=f"C{k + 1}", ls="--", lw=1, label=f"baseline {run.name}")
        if baselines and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        ax.set_title(metric, fontsize=10)
        ax.set_xticks(range(len(configs)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(configs) - 0.5)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        "mean ± std over seeds (dots: single runs; dashed: baseline, not in the grid)", fontsize=10
    )
    fig.tight_layout()
    save_figure(fig, path)


# --- running dvc and git


def dvc(args: list[str], repo: Path) -> str:
    try:
        return dvc_out(args, repo)
    except DvcFailed as err:
        raise PcamError(f"in {repo}: {err}") from None


def git(args: list[str], repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)


def lock_reader(repo: Path):
    """rev -> parsed dvc.lock of that commit (experiments are commits too), or None."""

    def read(rev: str) -> dict | None:
        proc = git(["show", f"{rev}:dvc.lock"], repo)
        return yaml.safe_load(proc.stdout) if proc.returncode == 0 else None

    return read


# --- changes


def changes_markdown(
    repo: Path,
    base: str,
    rev: str | None,
    out: Path | None,
    plots_dir: Path,
    html_template: Path | None = None,
) -> str:
    """Markdown comparing `rev` (default: the workspace) with `base`; writes the plots page."""
    revs = [base, *([rev] if rev else [])]
    shas = []
    for name, value in zip(("--base", "--rev"), revs, strict=False):
        proc = git(["rev-parse", "--verify", "--quiet", "--short", f"{value}^{{commit}}"], repo)
        if proc.returncode != 0:
            raise PcamError(f"{name} {value}: not a commit, branch or tag in {repo.resolve()}")
        shas.append(proc.stdout.strip())
    params_md = dvc(["params", "diff", *revs, "--md"], repo).strip()
    metrics_md = dvc(["metrics", "diff", *revs, "--md"], repo).strip()
    plots_dir = plots_dir.resolve()
    plots_dir.parent.mkdir(parents=True, exist_ok=True)  # dvc creates only the last level
    template = ["--html-template", str(html_template.resolve())] if html_template else []
    dvc(["plots", "diff", *revs, "-o", str(plots_dir), *template], repo)
    index = plots_dir / "index.html"
    if not index.is_file():
        raise PcamError(f"`dvc plots diff` wrote no {index}")
    # Relative to where the markdown lands, so the link works next to the file (or a CI artifact).
    link = os.path.relpath(index, (out.resolve().parent if out else Path.cwd()))
    command = f"python -m pcam.report changes --base {base}" + (f" --rev {rev}" if rev else "")
    target = f"`{rev}`" if rev else "the workspace"
    lines = [
        f"## Changes: {target} against `{base}` ({shas[0]})",
        "",
        f"Generated by `{command}`.",
        "",
        "### Params",
        "",
        params_md or "No param changed.",
        "",
        "### Metrics",
        "",
        metrics_md or "No metric changed.",
        "",
        "### Plots",
        "",
        f"[`dvc plots diff` page]({link}): training curves and ROC curves of both revisions.",
    ]
    return "\n".join(lines) + "\n"


# --- CLI


def cmd_experiments(args: argparse.Namespace) -> None:
    check_select(args.select)  # before the slow `dvc exp show`
    metrics = args.metric or list(MAIN_METRICS)
    if args.select not in metrics:
        metrics = [args.select, *metrics]
    if args.input:
        # A saved output may come from another clone: its commits need not be here to check.
        runs, notes = runs_from_exp_show(json.loads(args.input.read_text()))
    else:
        rev = ["--rev", args.rev] if args.rev else []
        runs, notes = runs_from_exp_show(
            json.loads(dvc(["exp", "show", "--json", *rev], args.repo))
        )
        runs, stale = drop_stale_metrics(runs, lock_reader(args.repo))
        notes += stale
    empty = [r for r in runs if all(metric_value(r, m) is None for m in metrics)]
    notes += [
        f"{r.name}: none of the reported metrics, left out"
        for r in empty
        if not any(n.startswith(f"{r.name}: ") for n in notes)  # already said why
    ]
    runs = [r for r in runs if r not in empty]
    baselines = [r for r in runs if r.baseline]
    grid, merged = dedupe([r for r in runs if not r.baseline])
    if not grid:
        raise PcamError(
            f"no finished experiment has any of {', '.join(metrics)} in `dvc exp show` (the "
            "baseline commit is not a sweep): run `make sweep sweep-run` first"
        )
    configs = group_configs(grid, args.seed_param)
    text = experiments_markdown(
        configs, metrics, args.select, args.lower_is_better, notes + merged, baselines
    )
    print(text, end="", flush=True)  # before the plot line on stderr
    if args.out:
        write_text(args.out, text)
    if args.plot:
        ordered = ranked(configs, args.select, args.lower_is_better)
        plot_experiments(args.plot, ordered, metrics, ordered[0], baselines)  # [0]: champion()
        print(f"plot: {args.plot}", file=sys.stderr)


def cmd_changes(args: argparse.Namespace) -> None:
    out = None if str(args.out) == "-" else args.out
    text = changes_markdown(args.repo, args.base, args.rev, out, args.plots_dir, args.html_template)
    if out is None:
        print(text, end="")
    else:
        write_text(out, text)
        print(f"wrote {out} (plots: {args.plots_dir / 'index.html'})")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pcam.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--repo", type=Path, default=Path("."), help="DVC repo root (default: .)")
    sub = parser.add_subparsers(dest="command", required=True)

    exp = sub.add_parser("experiments", help="mean ± std over seeds per configuration")
    exp.add_argument("--rev", help="the commit whose experiments to read (default: HEAD)")
    exp.add_argument("--input", type=Path, help="saved `dvc exp show --json` output")
    exp.add_argument("--metric", action="append", help=f"repeatable (default: {MAIN_METRICS})")
    exp.add_argument("--select", default=DEFAULT_SELECT, help="validation metric for the champion")
    exp.add_argument("--lower-is-better", action="store_true", help="for a loss as --select")
    exp.add_argument("--seed-param", default=SEED_PARAM, help="the param averaged over")
    exp.add_argument("--out", type=Path, help="also write the markdown here")
    exp.add_argument("--plot", type=Path, help="write a PNG of every metric per configuration")
    exp.set_defaults(func=cmd_experiments)

    ch = sub.add_parser("changes", help="params, metrics and plots diff as markdown")
    ch.add_argument("--base", default="main", help="git revision to compare with (default: main)")
    ch.add_argument("--rev", help="git revision to report on (default: the workspace)")
    ch.add_argument("--out", type=Path, default=Path("reports/changes.md"), help="- for stdout")
    ch.add_argument("--plots-dir", type=Path, default=Path("reports/plots"))
    ch.add_argument(
        "--html-template",
        type=Path,
        help="another `dvc plots` page template (default: .dvc/config's plots.html_template)",
    )
    ch.set_defaults(func=cmd_changes)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
