"""The ``mpq`` command line: parse, call, print. No logic lives here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mpq.evaluators.model import build_model
from mpq.files import owned_folder
from mpq.process import configure
from mpq.search.config import masked_url
from mpq.spaces.discover import discover_layers
from mpq.spaces.io import load_space, save
from mpq.spaces.space import SearchSpace
from mpq.zoo import MODEL_ALIASES, resolve_model

app = typer.Typer(
    help="Mixed-precision quantization search: real kernels, closed-loop task success.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(width=None if Console().is_terminal else 140)
err_console = Console(stderr=True, width=None if Console().is_terminal else 200)


ModelArg = Annotated[
    str,
    typer.Argument(
        help=f"module:function builder or one of {list(MODEL_ALIASES)}", metavar="MODEL"
    ),
]
TrackingUriOpt = Annotated[
    str | None, typer.Option(help="the MLflow tracking URI, where `mpq search` was given one")
]
OutputDirOpt = Annotated[
    str | None,
    typer.Option(
        "--output-dir", help="the study's output folder, where `mpq search` was given one"
    ),
]
CheckpointOpt = Annotated[Path | None, typer.Option(help="state_dict to load (weights_only=True)")]


@app.callback()
def _root(
    debug: Annotated[
        bool,
        typer.Option("--debug", help="full tracebacks of errors in your callables", metavar=""),
    ] = False,
) -> None:
    """mpq: find the smallest, fastest quantized model whose task success holds."""
    configure()
    if debug:
        import os

        from mpq.evaluators.callables import DEBUG_ENV

        os.environ[DEBUG_ENV] = "1"  # Ray's local workers inherit it


@contextlib.contextmanager
def one_line() -> Iterator[None]:
    """Every error a user can cause ends here: one line on stderr, exit status 2. A config,
    a callable, a file or folder of the OS's (with its path), a storage (its real cause)."""
    from mpq.search.storage import root_cause

    try:
        yield
    except ValueError as exc:
        fail(str(exc))
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        fail(f"{where}{exc.strerror or exc}")
    except Exception as exc:
        if not _is_storage_error(exc):
            raise
        fail(f"storage: {root_cause(exc)}")


def _is_storage_error(exc: BaseException) -> bool:
    import optuna
    import sqlalchemy.exc

    return isinstance(exc, optuna.exceptions.StorageInternalError | sqlalchemy.exc.SQLAlchemyError)


def fail(message: str) -> None:
    """One line on stderr, exit status 2."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def space(
    model: ModelArg,
    checkpoint: CheckpointOpt = None,
    space_file: Annotated[Path | None, typer.Option("--space", help="a space YAML/JSON")] = None,
    out: Annotated[Path | None, typer.Option(help="write the space (.yaml/.json)")] = None,
) -> None:
    """Discover the quantizable layers of MODEL and print the space of choices."""
    with one_line():
        net = build_model(resolve_model(model), checkpoint)
        layers = discover_layers(net)
        sp = load_space(space_file) if space_file else SearchSpace()
        resolved = sp.resolve(layers, str(space_file or "space"))
    table = Table(title=f"{model}: {len(layers)} quantizable layers")
    columns = ("layer", "kind", "params", "shape", "w_bits", "a_bits", "granularity", "tied")
    for col in (*columns, "fused with"):
        table.add_column(col, justify="right" if col == "params" else "left")
    for layer in layers:
        opts = resolved[layer.name]
        shape = "x".join(map(str, layer.shape))
        table.add_row(
            layer.name,
            layer.kind,
            f"{layer.num_params:,}",
            shape,
            ",".join(map(str, opts.w_bits)),
            ",".join(map(str, opts.a_bits)),
            ",".join(opts.granularity),
            ",".join(layer.tied),
            opts.fused_with if opts.fused_with not in (None, layer.name) else "",
        )
    console.print(table)
    from mpq.spaces.discover import coverage

    console.print(coverage(net, layers).line() + "; 32 = keep float32, 16 = float16")
    if out is not None:
        save(sp, out)
        console.print(f"space written to {out}")


@app.command()
def search(
    config: Annotated[Path, typer.Argument(help="search config (.yaml/.json)", metavar="CONFIG")],
    resume: Annotated[
        bool, typer.Option(help="continue the study of the same name", metavar="")
    ] = False,
    trials: Annotated[int | None, typer.Option(help="trials to finish in all")] = None,
    time_budget_s: Annotated[
        float | None,
        typer.Option(help="no trial starts after this many seconds (config: time_budget_s)"),
    ] = None,
    output_dir: Annotated[
        str | None, typer.Option(help="study database, plots, exports (config: output_dir)")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="trials at once (config: ray.workers)")
    ] = None,
    task_budget: Annotated[
        int | None, typer.Option(help="episodes per full evaluation (config: task_budget)")
    ] = None,
    sampler: Annotated[
        str | None, typer.Option(help="nsga2 | tpe | random | gp | mpq (config: sampler)")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="sampler seed (config: seed)")] = None,
    ray_address: Annotated[str | None, typer.Option(help="attach to this Ray cluster")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
    no_tracking: Annotated[
        bool, typer.Option("--no-tracking", help="skip MLflow", metavar="")
    ] = False,
    new_study: Annotated[
        bool,
        typer.Option(
            "--new-study",
            help="the setup changed (model, task, space, budgets, backend, CPU): start a study "
            "of its own beside the old one",
            metavar="",
        ),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", help="no progress bar or per-trial lines", metavar="")
    ] = False,
) -> None:
    """Search per-layer bit allocations; print the Pareto front."""
    from mpq.search.session import run_session

    with one_line():
        result = run_session(
            config,
            resume=resume,
            tracking=not no_tracking,
            console=console,
            new_study=new_study,
            quiet=quiet,
            trials=trials,
            time_budget_s=time_budget_s,
            output_dir=output_dir,
            workers=workers,
            task_budget=task_budget,
            sampler=sampler,
            seed=seed,
            ray_address=ray_address,
            tracking_uri=tracking_uri,
        )
    if result.interrupted:
        raise typer.Exit(130)


@app.command()
def sync(
    config: Annotated[Path, typer.Argument(help="search config (.yaml/.json)", metavar="CONFIG")],
    output_dir: OutputDirOpt = None,
    tracking_uri: TrackingUriOpt = None,
) -> None:
    """Back-fill MLflow runs for finished trials that have none (after a tracking outage)."""
    from mpq.search.session import build_config
    from mpq.search.study import load_existing
    from mpq.search.tracking import sync as sync_runs

    with one_line():
        cfg = build_config(config, output_dir=output_dir, tracking_uri=tracking_uri)
        added = sync_runs(cfg, load_existing(cfg), console)
    console.print(f"{added} trial run(s) back-filled in {masked_url(cfg.tracking_uri())}")


@app.command()
def ui(
    config: Annotated[Path, typer.Argument(help="search config (.yaml/.json)", metavar="CONFIG")],
    output_dir: OutputDirOpt = None,
    tracking_uri: TrackingUriOpt = None,
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 5000,
) -> None:
    """Open the MLflow UI on the study's tracking store (binds 127.0.0.1 unless asked)."""
    import sys

    from mpq.search.session import build_config

    with one_line():
        cfg = build_config(config, output_dir=output_dir, tracking_uri=tracking_uri)
    uri = cfg.tracking_uri()
    if not uri.startswith("sqlite:"):
        console.print(f"the study tracks to {masked_url(uri)}; open it there")
        return
    console.print(f"MLflow UI on http://{host}:{port} (Ctrl-C to stop)")
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
    ]
    from mpq.process import run_until_signalled

    raise typer.Exit(run_until_signalled(cmd))


@app.command()
def export(
    config: Annotated[Path, typer.Argument(help="search config (.yaml/.json)", metavar="CONFIG")],
    output_dir: OutputDirOpt = None,
    tracking_uri: TrackingUriOpt = None,
    out: Annotated[
        Path | None, typer.Option(help="output folder (default: <output_dir>/export/trial-N)")
    ] = None,
    trial: Annotated[int | None, typer.Option(help="export this trial number")] = None,
    rule: Annotated[str, typer.Option(help="knee | best")] = "knee",
    max_size_bytes: Annotated[int | None, typer.Option(help="best success within size")] = None,
    max_latency_ms: Annotated[
        float | None, typer.Option(help="best success within latency")
    ] = None,
    new_study: Annotated[
        bool,
        typer.Option("--new-study", help="the study `mpq search --new-study` started", metavar=""),
    ] = False,
) -> None:
    """Write a chosen configuration, its deployable model, packed artifact and model card."""
    from mpq.search.export import describe_export, export_trial, pick_reason, pick_trial
    from mpq.search.session import build_config
    from mpq.search.study import load_existing

    with one_line():
        cfg = build_config(config, output_dir=output_dir, tracking_uri=tracking_uri)
        if new_study:
            from mpq.evaluators.evaluator import get_evaluator
            from mpq.search.fingerprint import new_study_config
            from mpq.search.worker import eval_spec

            cfg = new_study_config(cfg, get_evaluator(eval_spec(cfg)).model)
        if rule not in ("knee", "best"):
            raise ValueError(f"--rule {rule!r} not in ['best', 'knee']")
        study = load_existing(cfg)
        chosen = pick_trial(study, trial, rule, max_size_bytes, max_latency_ms)
        why = pick_reason(study, chosen, trial, rule, max_size_bytes, max_latency_ms)
        target = out or owned_folder(cfg.output_dir, "export", cfg.name) / f"trial-{chosen.number}"
        info = export_trial(cfg, study, chosen, target, why)
    console.print(f"picked trial {chosen.number}: {why}")
    console.print(describe_export(info, chosen))
    if cfg.tracking.enabled and info["confirmed"]:
        from mpq.search.tracking import Tracker

        Tracker(cfg, console).confirm(study, chosen.number, info["confirmed"])


@app.command()
def finetune(
    config: Annotated[Path, typer.Argument(help="search config (.yaml/.json)", metavar="CONFIG")],
    output_dir: OutputDirOpt = None,
    trial: Annotated[int | None, typer.Option(help="fine-tune this trial's configuration")] = None,
    quant_config: Annotated[
        Path | None, typer.Option("--config", help="or this configuration file")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="output folder")] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate")] = None,
    progressive: Annotated[
        bool | None,
        typer.Option("--progressive/--one-step", help="step the bits down", metavar=""),
    ] = None,
    lsq: Annotated[
        bool | None, typer.Option("--lsq/--min-max", help="learned ranges", metavar="")
    ] = None,
) -> None:
    """Quantization-aware training of one configuration (a trial's or a file's): success
    before and after on the study's task, exported with its deployable model."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from mpq.search.finetune import describe, finetune_config, trial_config
    from mpq.search.session import build_config
    from mpq.search.study import load_existing
    from mpq.spaces.io import load_config

    with one_line():
        if (trial is None) == (quant_config is None):
            raise ValueError("finetune: give --trial N or --config FILE (one of them)")
        cfg = build_config(config, output_dir=output_dir)
        changes = {"steps": steps, "lr": lr, "progressive": progressive, "lsq": lsq}
        settings = cfg.qat.model_validate(
            {**cfg.qat.model_dump(), **{k: v for k, v in changes.items() if v is not None}}
        )
        study, kernels = None, {}
        if trial is not None:
            study = load_existing(cfg)
            qc, kernels = trial_config(study, trial)
        else:
            qc = load_config(quant_config)  # type: ignore[arg-type]
        name = f"trial-{trial}" if trial is not None else Path(str(quant_config)).stem
        target = out or owned_folder(cfg.output_dir, "finetuned", cfg.name) / name
        progress = Progress(
            TextColumn("QAT"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps, loss {task.fields[loss]:.4g}"),
            TimeRemainingColumn(),
            console=console,
        )
        with progress:
            task = progress.add_task("qat", total=settings.steps, loss=float("nan"))
            info = finetune_config(
                cfg,
                qc,
                settings,
                target,
                kernels,
                lambda n, loss: progress.update(task, completed=n, loss=loss),
            )
    console.print(describe(info))
    if cfg.tracking.enabled and study is not None:
        from mpq.search.tracking import Tracker

        Tracker(cfg, console).finetuned(study, info, trial, target / "qat_loss.png")


@app.command()
def allocate(
    config: Annotated[Path, typer.Argument(help="search config (.yaml/.json)", metavar="CONFIG")],
    budget: Annotated[float, typer.Option(help="size budget: a fraction of the 8-bit size")] = 0.5,
    method: Annotated[str, typer.Option(help="ilp | greedy")] = "ilp",
    out: Annotated[Path, typer.Option(help="write the configuration (.yaml/.json)")] = Path(
        "allocation.yaml"
    ),
) -> None:
    """A one-shot allocation from per-layer sensitivity, without a search: the ILP (least
    summed sensitivity within the size budget, solved exactly) or the greedy walk."""
    from mpq.evaluators.evaluator import get_evaluator
    from mpq.evaluators.size import config_size
    from mpq.search import sensitivity as sens
    from mpq.search.config import load_search_config
    from mpq.search.runner import preflight
    from mpq.search.worker import eval_spec

    with one_line():
        sens.check_allocation(method, budget)  # before the sensitivity is measured
        cfg = load_search_config(config)
        resolved = preflight(cfg, str(config))
        ev = get_evaluator(eval_spec(cfg))
        with console.status("measuring per-layer sensitivity (cached in output_dir)"):
            s = sens.measure_sensitivity(ev, resolved, Path(cfg.output_dir))
        qc = sens.allocation_at(ev, resolved, s, method, budget)
        save(qc, out)
    size = config_size(ev.model, ev.layers, qc).total_bytes
    console.print(
        f"{method} at {budget:g} of the 8-bit size: {size:,} bytes, summed sensitivity "
        f"{sens.summed_sensitivity(s, qc):.4g} (KL) -> {out}"
    )


@app.command("apply")
def apply_cmd(
    config: Annotated[
        Path, typer.Argument(help="a configuration (.yaml/.json)", metavar="CONFIG")
    ],
    model: ModelArg,
    checkpoint: CheckpointOpt = None,
    out: Annotated[Path | None, typer.Option(help="write the packed artifact here")] = None,
) -> None:
    """Rebuild the quantized model from a configuration and the float checkpoint."""
    import torch

    from mpq.evaluators.artifact import pack_state, payload_bytes
    from mpq.evaluators.size import config_size, float_size_bytes
    from mpq.spaces.io import load_config

    with one_line():
        qc = load_config(config)
        net = build_model(resolve_model(model), checkpoint)
        layers = discover_layers(net)
        qc.check(layers, str(config))
    size = config_size(net, layers, qc).total_bytes
    console.print(f"{model}: {float_size_bytes(net):,} float bytes -> {size:,} bytes")
    if out is not None:
        state = pack_state(net, layers, qc)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, out)
        console.print(f"artifact {out}: payload {payload_bytes(state):,} bytes")


@app.command()
def agent(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8787,
) -> None:
    """Time trials' models on this machine for a search elsewhere (latency.agent); the
    token in MPQ_AGENT_TOKEN. On a target without torch: python -m mpq.agent."""
    from mpq.agent import main as agent_main

    raise typer.Exit(agent_main(["--host", host, "--port", str(port)]))


@app.command("config-reference")
def config_reference(
    readme: Annotated[
        Path | None, typer.Option(help="write it into this README's section")
    ] = None,
) -> None:
    """Print the configuration reference (Markdown), generated from the config models."""
    from mpq.search.reference import config_reference_markdown, write_into_readme

    if readme is not None:
        write_into_readme(str(readme))
        return
    print(config_reference_markdown(), end="")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
