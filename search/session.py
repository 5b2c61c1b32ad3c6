"""One ``mpq search`` from start to end: config -> Ray -> runner -> tracking -> front table."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from mpq.evaluators.evaluator import get_evaluator
from mpq.files import owned_folder
from mpq.process import configure
from mpq.search import fingerprint, plots, study_setup
from mpq.search import study as study_mod
from mpq.search.cluster import capped_workers, ray_session
from mpq.search.config import SearchConfig, load_search_config, masked_url
from mpq.search.pareto import (
    aa_speedup,
    format_speedup,
    format_success,
    front_table,
    hypervolume,
    seed_dominations,
)
from mpq.search.runner import Runner, SearchResult, preflight
from mpq.search.worker import eval_spec
from mpq.spaces.space import LayerOptions, QuantConfig

# ``mpq search`` flags -> the config field each one overrides for this run
FLAG_FIELDS: dict[str, tuple[str, ...]] = {
    "trials": ("trials",),
    "time_budget_s": ("time_budget_s",),
    "output_dir": ("output_dir",),
    "workers": ("ray", "workers"),
    "task_budget": ("task_budget",),
    "sampler": ("sampler",),
    "seed": ("seed",),
    "ray_address": ("ray", "address"),
    "tracking_uri": ("tracking", "uri"),
}


def build_config(path: str | Path, tracking: bool = True, **flags: Any) -> SearchConfig:
    """The config file with this run's flags (``FLAG_FIELDS``; None: not given) on top.

    Raises:
        ValueError: one line naming the file for a bad file, the flag for a bad flag value
            (``--trials: Input should be greater than or equal to 1``).
    """
    from pydantic import ValidationError

    cfg = load_search_config(path)
    data = cfg.model_dump()
    for flag, value in flags.items():
        if value is None:
            continue
        *parents, leaf = FLAG_FIELDS[flag]
        node = data
        for key in parents:
            node = node[key]
        node[leaf] = value
    if not tracking:
        data["tracking"]["enabled"] = False
    try:
        return SearchConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(str(p) for p in err["loc"])
        flag = next((f for f, field in FLAG_FIELDS.items() if field == loc), None)
        where = f"--{flag.replace('_', '-')}" if flag else f"{path}: {'.'.join(loc)}"
        raise ValueError(f"{where}: {err['msg']}") from None


def run_search(
    cfg: SearchConfig,
    resume: bool = False,
    console: Console | None = None,
    progress: Callable[[dict[str, int]], None] | None = None,
    resolved: dict[str, LayerOptions] | None = None,
    extra: Sequence[tuple[str, QuantConfig]] = (),
    on_trial: Callable[[Any, Any], None] | None = None,
) -> SearchResult:
    """Run (or resume) the search of ``cfg``: the one start-up sequence of ``mpq search``, the
    benchmarks and scripts. Ray is started for it (or attached, or the running one reused),
    MLflow tracks it when ``cfg.tracking.enabled``, and the study is in ``cfg.storage_url()``.

    ``resolved``: the space as ``runner.preflight`` returned it, when the caller checked it.
    ``extra``: ``(proposed_by, config)`` pairs to measure first, after the seed trials
    (enqueued on every call: a resumed study measures a repeated one as a duplicate, free).
    ``on_trial``: called with (study, frozen trial) for every finished trial, after tracking.

    Raises:
        ValueError: a bad config, space, model, task, storage or cluster, in one line.
    """
    configure()
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    cfg, note = capped_workers(cfg)  # a local Ray: this machine's CPUs
    if note:
        (console or Console(stderr=True)).print(f"[yellow]note:[/] {note}")
    tracker = None
    if cfg.tracking.enabled:
        from mpq.search.tracking import Tracker

        tracker = Tracker(cfg, console)
    with ray_session(cfg):
        if cfg.ray.address is not None:  # attached: the cluster's CPUs
            cfg, note = capped_workers(cfg)
            if note:
                (console or Console(stderr=True)).print(f"[yellow]note:[/] {note}")
        callbacks = [c for c in (tracker.on_trial if tracker else None, on_trial) if c]

        def finished(study: Any, trial: Any) -> None:
            for callback in callbacks:
                callback(study, trial)

        runner = Runner(cfg, resume, on_trial=finished, progress=progress, resolved=resolved)
        runner.prepare()
        study_setup.enqueue_configs(runner.study, runner.resolved, extra)
        if tracker:
            tracker.start(runner.study, searching=True)
        result = runner.run()
    drop = cfg.constraints.max_success_drop
    min_success = None if drop is None else float(result.float_reference["success"]) - drop
    try:
        folder = owned_folder(cfg.output_dir, "plots", cfg.name)
        result.plots = plots.write_all(result.study, folder, min_success)
    except Exception as exc:  # noqa: BLE001  a plot never costs the study its tracking or export
        (console or Console(stderr=True)).print(f"[yellow]plots not written[/]: {exc!r}"[:300])
    if tracker:
        tracker.finish(
            result.study,
            result.plots,
            interrupted=result.interrupted,
            out_of_time=result.out_of_time,
        )
    return result


def check_output_dir(path: str | Path) -> None:
    """The output folder exists (made where missing) and is a folder this process can write.

    Raises:
        ValueError: one line with the path and the real cause.
    """
    import os

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"output_dir {str(p)!r} is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"output_dir {str(p)!r}: {exc.strerror or exc}") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir {str(p)!r} is not writable by this user")


def run_session(
    path: str | Path,
    resume: bool = False,
    tracking: bool = True,
    console: Console | None = None,
    new_study: bool = False,
    quiet: bool = False,
    **flags: Any,
) -> SearchResult:
    """``mpq search``: run (or resume) the search described by the config file at ``path``,
    with a progress bar and one line per finished trial, then print the front and export its
    knee. ``flags``: this run's overrides (``FLAG_FIELDS``). Everything that can be checked is
    checked before Ray starts: config, flags, space, model, storage, the study's state.

    ``new_study``: run under the config's name plus the fingerprint's short hash (resumed when
    that study exists), for a setup that changed since the study of the plain name ran.
    ``quiet``: no progress bar and no per-trial lines (CI logs): the summary only.
    """
    console = console or Console()
    cfg = build_config(path, tracking, **flags)
    resolved = preflight(cfg, str(path))  # writes nothing
    check_output_dir(cfg.output_dir)
    model = get_evaluator(eval_spec(cfg)).model
    if new_study:
        cfg, resume = fingerprint.new_study_config(cfg, model), True
        console.print(f"study {cfg.name!r} in {cfg.output_dir} (--new-study)")
    if resume:  # a study measured under another setup is refused before Ray starts
        fingerprint.check_stored(cfg, model)
    else:
        study_mod.refuse_existing(cfg)
    if quiet:
        result = run_search(cfg, resume, console, None, resolved)
        print_summary(console, cfg, result, result.float_reference)
        export_best(console, cfg, result, path)
        return result
    with _progress(console) as bar:
        task = bar.add_task("float reference and sensitivity", total=cfg.trials)

        def report(counts: dict[str, int]) -> None:
            done = counts["complete"] + counts["pruned"] + counts["fail"]
            left = counts.get("time_left_s")  # a time budget ends the run, not the trials
            bar.update(
                task,
                completed=min(done, cfg.trials),
                description=(
                    f"{counts['complete']} done, {counts['pruned']} pruned, {counts['fail']} "
                    f"failed, {counts['in_flight']} running, front {counts['front']}"
                    + ("" if left is None else f", {left} s of the time budget left")
                ),
            )

        result = run_search(
            cfg, resume, console, report, resolved, on_trial=lambda s, t: _trial_line(bar, s, t)
        )
    print_summary(console, cfg, result, result.float_reference)
    export_best(console, cfg, result, path)
    if result.plots:
        console.print("plots: " + "  ".join(str(p) for p in result.plots))
    return result


def export_best(
    console: Console, cfg: SearchConfig, result: SearchResult, path: str | Path
) -> None:
    """Export the knee of the front to ``<output_dir>/best`` and say how to look further."""
    from mpq.search.export import describe_export, export_trial, pick_reason, pick_trial
    from mpq.search.pareto import front_trials

    if front_trials(result.study):
        chosen = pick_trial(result.study, rule="knee")
        why = pick_reason(result.study, chosen, rule="knee")
        target = owned_folder(cfg.output_dir, "best", cfg.name)
        info = export_trial(cfg, result.study, chosen, target, why)
        console.print(f"knee of the front: {describe_export(info, chosen)}")
        if cfg.tracking.enabled and info["confirmed"]:
            from mpq.search.tracking import Tracker

            Tracker(cfg, console).confirm(result.study, chosen.number, info["confirmed"])
    if cfg.tracking.enabled:
        console.print(
            f"MLflow UI: mpq ui {path}{_dir_flag(cfg, path)}   (or mlflow ui "
            f"--backend-store-uri {masked_url(cfg.tracking_uri())})"
        )


def _dir_flag(cfg: SearchConfig, path: str | Path) -> str:
    """`` --output-dir X`` where this run's output folder is not the config file's (the
    commands that read the study afterwards need it too)."""
    try:
        own = load_search_config(path).output_dir
    except ValueError:
        return ""
    import shlex

    return "" if own == cfg.output_dir else f" --output-dir {shlex.quote(cfg.output_dir)}"


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]search[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
    )


def trial_line(study: Any, t: Any) -> str:
    """One finished trial in a line: number, who proposed it, success, size, speed-up, state
    (and why it failed)."""
    from mpq.search.record import TrialRecord, float_reference

    r = TrialRecord.from_frozen(t)
    m = r.measurements
    parts = [f"trial {r.number:>3} {r.proposed_by:<14}"]
    if m.success is not None:
        parts.append(f"success {format_success(t.user_attrs)}")
    if m.size_bytes:
        ratio = m.compression(float_reference(study.user_attrs).size_bytes)
        parts.append(f"{m.size_bytes / 1e6:.2f} MB" + (f" ({ratio:.1f}x)" if ratio else ""))
    if m.speedup:
        parts.append(f"speed-up {format_speedup(t.user_attrs)}")
    state = r.state.name.lower() + (
        "" if r.feasible or r.state.name != "COMPLETE" else ", infeasible"
    )
    if r.duplicate_of is not None:
        state += f", duplicate of {r.duplicate_of}"
    if r.fail_reason:
        state += f": {r.fail_reason[:120]}"
    return "  ".join(parts) + f"  [{state}]"


def _trial_line(bar: Progress, study: Any, t: Any) -> None:
    bar.console.print(trial_line(study, t), highlight=False, soft_wrap=True)


def domination_lines(study: Any) -> list[str]:
    """What the search found beyond the one-shot allocations it started from: each front point
    it proposed that dominates a seed, with the paired success difference."""
    rows = seed_dominations(study)
    if not rows:
        return ["no front point proposed by the search dominates a seed trial"]
    out = [
        "front points proposed by the search that dominate a seed (success paired on the "
        "same episodes, 95%):"
    ]
    for r in rows:
        success = "success: no per-episode outcomes"
        if r["success_diff"] is not None:
            verdict = "within noise"
            if r["beyond_noise"]:
                verdict = "beyond noise"
            elif r["non_inferior"]:
                verdict += f"; non-inferior (lower end >= -{r['margin']:.3f})"
            success = (
                f"success {r['success_diff']:+.3f} [{r['success_lo_diff']:+.3f}, "
                f"{r['success_hi_diff']:+.3f}] over {r['episodes']} episodes, {verdict}"
            )
        size = f"{r['size_ratio']:.2f}x smaller" if r["size_ratio"] else "size -"
        speed = f"{r['speedup_ratio']:.2f}x the speed-up" if r["speedup_ratio"] else "speed -"
        out.append(
            f"  trial {r['trial']} dominates {r['seed']} (trial {r['seed_trial']}): {size}, "
            f"{speed}, {success}"
        )
    return out


def print_summary(
    console: Console, cfg: SearchConfig, result: SearchResult, ref: dict[str, Any]
) -> None:
    df = front_table(result.study)
    table = Table(title=f"Pareto front of {cfg.name!r} ({len(df)} trials)")
    columns = {  # header -> the row's text; intervals are 95%
        "trial": lambda r: _fmt(r["trial"]),
        "success (95%)": format_success,
        "size_bytes": lambda r: _fmt(r.get("size_bytes")),
        "compression (x)": lambda r: _fmt(r.get("compression")),
        "latency_ms": lambda r: _fmt(r.get("latency_ms")),
        "speed-up (95%)": format_speedup,
        "mean w bits": lambda r: _fmt(r.get("ran_mean_w_bits")),
        "proposed by": lambda r: str(r.get("proposed_by")),
    }
    if df.get("qat_steps") is not None and df["qat_steps"].notna().any():
        columns["needs QAT (PTQ success)"] = lambda r: (
            f"yes ({r['ptq_success']:.3f})" if r.get("qat_steps") else "no"
        )
    refined = df.get("success_before_refine")
    if refined is not None and refined.notna().any():
        columns["close call (full budget)"] = lambda r: (
            f"yes ({r['success_before_refine']:.3f})"
            if r.get("success_before_refine") is not None
            else "no"
        )
    for name in columns:
        left = name == "proposed by" or name.startswith(("needs QAT", "close call"))
        table.add_column(name, justify="left" if left else "right", no_wrap=True)
    for _, row in df.iterrows():
        attrs = {k: (None if pd.isna(v) else v) for k, v in row.items()}
        table.add_row(*[show(attrs) for show in columns.values()])
    console.print(table)
    lat = ref.get("latency_ms")
    console.print(
        f"float model: success {ref.get('success', float('nan')):.3f}, "
        f"{ref.get('size_bytes', 0):,} bytes"
        + (
            f", {lat:.3f} ms (A/A against a fresh copy: {format_speedup(aa_speedup(ref))})"
            if lat
            else ""
        )
    )
    for line in domination_lines(result.study):
        console.print(line)
    console.print(f"hypervolume {hypervolume(result.study):.4f}  storage {cfg.storage_shown()}")
    if result.interrupted:
        console.print("[yellow]interrupted[/]: finished trials are kept; --resume continues")
    elif result.out_of_time:
        console.print(
            f"time budget of {cfg.time_budget_s:.0f} s spent: no trial started after it "
            "(--resume goes on)"
        )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    return "" if v is None else f"{v:,}" if isinstance(v, int) else str(v)
