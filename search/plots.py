"""Plots of a study: the Pareto front (interactive HTML + static PNG) and the bit-width map.

Compute, then render: ``front_frame`` gathers the figures (tested), the ``plot_*`` functions
only draw them.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from mpq.search.pareto import front_trials, records, trial_row
from mpq.search.record import TrialRecord


def front_frame(study: optuna.Study) -> pd.DataFrame:
    """Every complete trial with its figures and whether it is on the front."""
    front = {t.number for t in front_trials(study)}
    rows = []
    for record in records(study, states=(TrialState.COMPLETE,)):
        row = trial_row(study, record)
        row["on_front"] = record.number in front
        rows.append(row)
    return pd.DataFrame(rows)


def bit_map(study: optuna.Study) -> pd.DataFrame:
    """Layers x front trials: the weight bit-width each front configuration gives each layer."""
    cols = {}
    for record in map(TrialRecord.from_frozen, front_trials(study)):
        if record.config is not None:
            layers = record.config.layers
            cols[f"trial {record.number}"] = {n: c.w_bits for n, c in layers.items()}
    return pd.DataFrame(cols)


def _pyplot():  # type: ignore[no-untyped-def]
    """matplotlib's pyplot on the file-only Agg backend (no display on servers and in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_front_html(df: pd.DataFrame, path: Path) -> None:
    import plotly.express as px

    if df.empty:
        path.write_text("<p>no complete trial</p>")
        return
    df = df.assign(kind=df["on_front"].map({True: "Pareto front", False: "other"}))
    size = "size_bytes" if "size_bytes" in df else None
    y = "latency_ms" if "latency_ms" in df and df["latency_ms"].notna().all() else None
    fig = px.scatter(
        df,
        x=size,
        y="success",
        color="kind",
        symbol="feasible",
        size="latency_ms" if y else None,
        hover_data=[
            c
            for c in (
                "trial",
                "success_lo",
                "success_hi",
                "compression",
                "speedup",
                "ran_mean_w_bits",
                "proposed_by",
            )
            if c in df
        ],
        title="success vs size (marker size: latency)",
    )
    fig.write_html(path, include_plotlyjs=True)


def plot_front_png(df: pd.DataFrame, path: Path) -> None:
    plt = _pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, x in zip(axes, ("size_bytes", "latency_ms"), strict=True):
        if df.empty or x not in df or df[x].isna().all():
            ax.set_title(f"no {x}")
            continue
        other, front = df[~df["on_front"]], df[df["on_front"]]
        ax.scatter(other[x], other["success"], c="lightgray", label="trials")
        ax.scatter(front[x], front["success"], c="crimson", label="Pareto front")
        for _, r in front.iterrows():
            ax.annotate(str(r["trial"]), (r[x], r["success"]), fontsize=7)
        ax.set_xlabel(x)
        ax.set_ylabel("task success")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bit_map(bits: pd.DataFrame, html: Path, png: Path) -> None:
    import plotly.express as px

    if bits.empty:
        html.write_text("<p>no front</p>")
        return
    fig = px.imshow(
        bits,
        text_auto=True,
        aspect="auto",
        color_continuous_scale="Viridis",
        title="weight bits per layer on the Pareto front (32 = float)",
    )
    fig.write_html(html, include_plotlyjs=True)
    plt = _pyplot()

    fig2, ax = plt.subplots(figsize=(1.2 + 0.6 * bits.shape[1], 0.8 + 0.3 * bits.shape[0]))
    im = ax.imshow(bits.to_numpy(dtype=float), aspect="auto", cmap="viridis")
    ax.set_xticks(range(bits.shape[1]), bits.columns, rotation=60, fontsize=7)
    ax.set_yticks(range(bits.shape[0]), bits.index, fontsize=7)
    fig2.colorbar(im, ax=ax, label="w_bits")
    fig2.tight_layout()
    fig2.savefig(png, dpi=110)
    plt.close(fig2)


def write_all(study: optuna.Study, out: Path) -> list[Path]:
    df = front_frame(study)
    plot_front_html(df, out / "pareto_front.html")
    plot_front_png(df, out / "pareto_front.png")
    plot_bit_map(bit_map(study), out / "bit_map.html", out / "bit_map.png")
    return sorted(out.iterdir())
