"""The ``mpq`` command line: parse, call, print. No logic lives here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mpq.evaluators.model import MODEL_ALIASES, build_model
from mpq.spaces.discover import discover_layers
from mpq.spaces.io import load_space, save
from mpq.spaces.space import SearchSpace

app = typer.Typer(
    help="Mixed-precision quantization search: real kernels, closed-loop task success.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(width=None if Console().is_terminal else 140)
err_console = Console(stderr=True, width=None if Console().is_terminal else 200)


ModelArg = Annotated[
    str, typer.Argument(help=f"module:function builder or one of {list(MODEL_ALIASES)}")
]
CheckpointOpt = Annotated[Path | None, typer.Option(help="state_dict to load (weights_only=True)")]


@app.callback()
def _root() -> None:
    """mpq: find the smallest, fastest quantized model whose task success holds."""


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
    try:
        net = build_model(model, checkpoint)
        layers = discover_layers(net)
        sp = load_space(space_file) if space_file else SearchSpace()
        resolved = sp.resolve(layers, str(space_file or "space"))
    except ValueError as exc:
        fail(str(exc))
        return
    table = Table(title=f"{model}: {len(layers)} quantizable layers")
    for col in ("layer", "kind", "params", "shape", "w_bits", "a_bits", "granularity", "tied"):
        table.add_column(col, justify="right" if col == "params" else "left")
    for layer in layers:
        opts = resolved[layer.name]
        shape = "x".join(map(str, layer.shape))
        table.add_row(layer.name, layer.kind, f"{layer.num_params:,}", shape,
                      ",".join(map(str, opts.w_bits)), ",".join(map(str, opts.a_bits)),
                      ",".join(opts.granularity), ",".join(layer.tied))  # fmt: skip
    console.print(table)
    n = sum(la.num_params for la in layers)
    console.print(f"{n:,} quantizable parameters; 32 = keep float32, 16 = float16")
    if out is not None:
        save(sp, out)
        console.print(f"space written to {out}")


@app.command()
def search(
    config: Annotated[Path, typer.Argument(help="search config (.yaml/.json)")],
    resume: Annotated[bool, typer.Option(help="continue the study of the same name")] = False,
    trials: Annotated[int | None, typer.Option(help="trials to finish in all")] = None,
    ray_address: Annotated[str | None, typer.Option(help="attach to this Ray cluster")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
    no_tracking: Annotated[bool, typer.Option("--no-tracking", help="skip MLflow")] = False,
) -> None:
    """Search per-layer bit allocations; print the Pareto front."""
    from mpq.search.session import run_session

    try:
        result = run_session(config, resume=resume, trials=trials, ray_address=ray_address,
                             tracking_uri=tracking_uri, tracking=not no_tracking,
                             console=console)  # fmt: skip
    except ValueError as exc:
        fail(str(exc))
        return
    if result.interrupted:
        raise typer.Exit(130)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
