"""Plots of a study: the Pareto front (interactive HTML + static PNG) and the bit map.

Compute, then render: ``front_frame`` and ``bit_map`` gather the figures (tested), the
``plot_*`` functions only draw them. What a person needs at a glance: units (KB/MB, ms,
success %), the float model and the success constraint drawn, the front marked (a point of a
three-objective front can look dominated in a two-axis projection: the legend says so, and
the front points that lead on an objective are named), pruned trials shown at their screening
figures; the bit map in discrete colours, weight and activation bits per layer, and (in the
HTML) the kernel that ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from mpq.search.pareto import front_trials, records, trial_row
from mpq.search.record import StudyAttr, TrialAttr, TrialRecord

FRONT, OTHER, PRUNED = "Pareto front", "other trials", "pruned (screening figures)"
BIT_COLOURS = {  # discrete: one colour per width, float in grey
    2: "#d7191c",
    3: "#f17c4a",
    4: "#fec980",
    5: "#ffffbf",
    6: "#c7e9ad",
    8: "#80bfab",
    16: "#2b83ba",
    32: "#bdbdbd",
}


def config_summary(record: TrialRecord) -> str:
    """``w 4x8, 3x4, 1x32 | a 8x12`` : how many layers run at each weight and activation width
    (what ran), for hover text."""
    config = record.config_as_ran
    if config is None:
        return ""
    w: dict[int, int] = {}
    a: dict[int, int] = {}
    for c in config.layers.values():
        w[c.w_bits] = w.get(c.w_bits, 0) + 1
        a[c.a_bits] = a.get(c.a_bits, 0) + 1

    def fmt(d: dict[int, int]) -> str:
        return ", ".join(f"{n}x{b}" for b, n in sorted(d.items()))

    return f"w {fmt(w)} | a {fmt(a)}"


def front_frame(study: optuna.Study) -> pd.DataFrame:
    """Every complete and pruned trial with its figures, whether it is on the front, what it
    leads on among the front (``leads``) and a summary of its bits."""
    front = {t.number for t in front_trials(study)}
    rows = []
    states = (TrialState.COMPLETE, TrialState.PRUNED)
    for record in records(study, states=states):
        row = trial_row(study, record)
        row["on_front"] = record.number in front
        row["kind"] = (
            FRONT if row["on_front"] else (PRUNED if record.state == TrialState.PRUNED else OTHER)
        )
        row["bits"] = config_summary(record)
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["leads"] = ""
    on = df[df["on_front"]]
    for column, label, best in (
        ("success", "most successful", "max"),
        ("size_bytes", "smallest", "min"),
        ("latency_ms", "fastest", "min"),
    ):
        if column in on and on[column].notna().any():
            value = on[column].max() if best == "max" else on[column].min()
            tied = on[on[column] == value]
            # one leader per title: of trials tied on it (many front points at the float
            # model's success), the best on the other objectives, so labels do not pile up
            names = ("success", "size_bytes", "latency_ms")
            others = [c for c in names if c in on and c != column]
            ranks = [  # unmeasured (no latency objective): last
                pd.to_numeric(tied[c], errors="coerce").mul(-1 if c == "success" else 1)
                for c in others
            ]
            ranks = [r.fillna(float("inf")) for r in ranks]
            order = sorted(tied.index, key=lambda i: tuple(float(r[i]) for r in ranks))
            hit = order[:1]
            df.loc[hit, "leads"] = df.loc[hit, "leads"].map(
                lambda s, lab=label: f"{s}, {lab}" if s else lab
            )
    return df


def bit_map(study: optuna.Study) -> pd.DataFrame:
    """Layers x front trials: the weight bit-width each front configuration gives each layer."""
    return _bit_table(study, "w_bits")


def _bit_table(study: optuna.Study, dim: str) -> pd.DataFrame:
    cols = {}
    for record in map(TrialRecord.from_frozen, front_trials(study)):
        config = record.config_as_ran
        if config is not None:
            cols[f"trial {record.number}"] = {n: getattr(c, dim) for n, c in config.layers.items()}
    return pd.DataFrame(cols)


def kernel_map(study: optuna.Study) -> pd.DataFrame:
    """Layers x front trials: the kernel each layer ran on."""
    cols = {}
    for t in front_trials(study):
        kernels = t.user_attrs.get(TrialAttr.KERNELS, {})
        if kernels:
            cols[f"trial {t.number}"] = dict(kernels)
    return pd.DataFrame(cols)


def _pyplot():  # type: ignore[no-untyped-def]
    """matplotlib's pyplot on the file-only Agg backend (no display on servers and in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _size_unit(values: pd.Series) -> tuple[float, str]:
    top = float(values.max()) if len(values) else 0.0
    return (1e6, "MB") if top >= 1e6 else (1e3, "KB")


def _title(study: optuna.Study) -> str:
    ref = study.user_attrs.get(StudyAttr.FLOAT_REFERENCE, {})
    parts = [f"study {study.study_name!r}"]
    if "success" in ref:
        parts.append(f"float: success {100 * ref['success']:.1f}%")
    if ref.get("size_bytes"):
        scale, unit = _size_unit(pd.Series([ref["size_bytes"]]))
        parts.append(f"{ref['size_bytes'] / scale:.2f} {unit}")
    if ref.get("latency_ms"):
        parts.append(f"{ref['latency_ms']:.3f} ms")
    return ", ".join(parts)


def plot_front_png(
    df: pd.DataFrame, path: Path, study: optuna.Study, min_success: float | None = None
) -> None:
    """Success (%) against size and against latency, the float model as a star, the success
    constraint as a dashed line, the front in red with its leaders named."""
    plt = _pyplot()
    ref = study.user_attrs.get(StudyAttr.FLOAT_REFERENCE, {})
    axes_of = [("size_bytes", "deployable size"), ("latency_ms", "latency per step (ms)")]
    axes_of = [a for a in axes_of if not df.empty and a[0] in df and df[a[0]].notna().any()]
    fig, axes = plt.subplots(1, max(len(axes_of), 1), figsize=(6 * max(len(axes_of), 1), 4.6))
    axes = axes if hasattr(axes, "__len__") else [axes]
    if not axes_of:
        axes[0].set_title("no complete trial")
    for ax, (x, label) in zip(axes, axes_of, strict=False):
        scale, unit = _size_unit(df[x]) if x == "size_bytes" else (1.0, "")
        xlabel = f"{label} ({unit})" if unit else label
        for kind, style in (
            (PRUNED, {"c": "#bbbbbb", "marker": "x", "s": 18}),
            (OTHER, {"c": "#9e9e9e", "marker": "o", "s": 18, "alpha": 0.6}),
            (FRONT, {"c": "crimson", "marker": "o", "s": 36, "edgecolors": "black"}),
        ):
            part = df[df["kind"] == kind]
            if not part.empty:
                ax.scatter(part[x] / scale, 100 * part["success"], label=kind, **style)
        if ref.get(x) and "success" in ref:
            ax.scatter(
                [ref[x] / scale],
                [100 * ref["success"]],
                marker="*",
                s=160,
                c="black",
                label="float model",
                zorder=5,
            )
        if min_success is not None:
            ax.axhline(
                100 * min_success,
                ls="--",
                c="#555555",
                lw=1,
                label=f"success constraint ({100 * min_success:.1f}%)",
            )
        labels = sorted(_leader_labels(df, x, scale).items())
        for i, ((px, py), label) in enumerate(labels):  # stacked: close points never overlap
            ax.annotate(
                label,
                (px, 100 * py),
                xytext=(6, -10 - 9 * i),
                textcoords="offset points",
                fontsize=7,
                color="crimson",
            )
        ax.set_xlabel(xlabel)
        ax.set_ylim(top=min(ax.get_ylim()[1], 100.5))  # a success rate: never above 100%
        ax.set_ylabel("task success (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(
        fontsize=7,
        loc="lower right",
        title="front: non-dominated in all 3 objectives" if len(axes_of) > 1 else None,
        title_fontsize=7,
    )
    fig.suptitle(_title(study), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _leader_labels(df: pd.DataFrame, x: str, scale: float) -> dict[tuple[float, float], str]:
    """One label per plotted position of the front's leaders (trials within 1% of the axis
    of each other share it: ``86, 164: most successful``); positions in axis units."""
    out: dict[tuple[float, float], list[str]] = {}
    leads: dict[tuple[float, float], list[str]] = {}
    for _, r in df[df["leads"] != ""].iterrows():
        step = 0.01 * float(df[x].max()) / scale or 1.0
        key = (round(float(r[x]) / scale / step) * step, float(r["success"]))
        out.setdefault(key, []).append(str(r["trial"]))
        for lead in str(r["leads"]).split(", "):
            if lead not in leads.setdefault(key, []):
                leads[key].append(lead)
    return {k: f"{', '.join(v)}: {', '.join(leads[k])}" for k, v in out.items()}


def plot_front_html(
    df: pd.DataFrame, path: Path, study: optuna.Study, min_success: float | None = None
) -> None:
    """The same front, interactive: hover gives the trial's figures and bits."""
    import plotly.express as px

    if df.empty:
        path.write_text("<p>no complete trial</p>")
        return
    scale, unit = _size_unit(df["size_bytes"]) if "size_bytes" in df else (1.0, "")
    plot = df.assign(
        success_pct=100 * df["success"],
        size=df["size_bytes"] / scale if "size_bytes" in df else None,
    )
    has_latency = "latency_ms" in df and df["latency_ms"].notna().all()
    fig = px.scatter(
        plot,
        x="size",
        y="success_pct",
        color="kind",
        color_discrete_map={FRONT: "crimson", OTHER: "#9e9e9e", PRUNED: "#cccccc"},
        size="latency_ms" if has_latency else None,
        hover_data={
            c: True
            for c in (
                "trial",
                "leads",
                "bits",
                "compression",
                "speedup",
                "latency_ms",
                "proposed_by",
            )
            if c in plot
        }
        | {"size": ":.3f", "success_pct": ":.1f"},
        labels={"size": f"deployable size ({unit})", "success_pct": "task success (%)"},
        title=_title(study) + (" (marker size: latency)" if has_latency else ""),
    )
    ref = study.user_attrs.get(StudyAttr.FLOAT_REFERENCE, {})
    if ref.get("size_bytes") and "success" in ref:
        fig.add_scatter(
            x=[ref["size_bytes"] / scale],
            y=[100 * ref["success"]],
            mode="markers",
            marker={"symbol": "star", "size": 16, "color": "black"},
            name="float model",
        )
    if min_success is not None:
        fig.add_hline(y=100 * min_success, line_dash="dash", annotation_text="constraint")
    fig.write_html(path, include_plotlyjs=True)


def plot_bit_map(study: optuna.Study, html: Path, png: Path) -> None:
    """Layers x front trials in discrete colours by weight width, each cell ``w4 a8``; the
    HTML adds the kernel that ran."""
    w, a = bit_map(study), _bit_table(study, "a_bits")
    if w.empty:
        html.write_text("<p>no front</p>")
        _empty_png(png, "no front")
        return
    text = w.astype(int).astype(str).radd("w") + " " + a.astype(int).astype(str).radd("a")
    kernels = kernel_map(study).reindex(index=w.index, columns=w.columns)
    _bit_map_png(w, text, png, study)
    _bit_map_html(w, text, kernels, html, study)


def _colour_index(w: pd.DataFrame) -> tuple[list[int], Any]:
    widths = sorted(b for b in BIT_COLOURS if (w == b).any().any())
    return widths, w.apply(lambda col: col.map({b: i for i, b in enumerate(widths)}))


def _bit_map_png(w: pd.DataFrame, text: pd.DataFrame, png: Path, study: optuna.Study) -> None:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    plt = _pyplot()
    widths, index = _colour_index(w)
    cmap = ListedColormap([BIT_COLOURS[b] for b in widths])
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * w.shape[1], 1.2 + 0.32 * w.shape[0]))
    ax.imshow(
        index.to_numpy(dtype=float), aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(widths) - 0.5
    )
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            ax.text(j, i, text.iat[i, j], ha="center", va="center", fontsize=6)
    ax.set_xticks(range(w.shape[1]), w.columns, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(w.shape[0]), w.index, fontsize=7)
    handles = [
        Patch(color=BIT_COLOURS[b], label="float" if b == 32 else f"{b}-bit") for b in widths
    ]
    ax.legend(
        handles=handles,
        title="weights",
        fontsize=7,
        title_fontsize=7,
        bbox_to_anchor=(1.02, 1),
        loc="upper left",
    )
    ax.set_title(
        f"bits per layer on the Pareto front of {study.study_name!r} (as run)", fontsize=9
    )
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _bit_map_html(
    w: pd.DataFrame, text: pd.DataFrame, kernels: pd.DataFrame, html: Path, study: optuna.Study
) -> None:
    import plotly.graph_objects as go

    widths, index = _colour_index(w)
    n = max(len(widths) - 1, 1)
    scale = (
        [[i / n, BIT_COLOURS[b]] for i, b in enumerate(widths)]
        if len(widths) > 1
        else [[0, BIT_COLOURS[widths[0]]], [1, BIT_COLOURS[widths[0]]]]
    )
    hover = text + "<br>" + kernels.fillna("").astype(str)
    fig = go.Figure(
        go.Heatmap(
            z=index.to_numpy(),
            x=list(w.columns),
            y=list(w.index),
            text=text.to_numpy(),
            texttemplate="%{text}",
            customdata=hover.to_numpy(),
            hovertemplate="%{y} on %{x}<br>%{customdata}<extra></extra>",
            colorscale=scale,
            showscale=False,
        )
    )
    fig.update_layout(
        title=f"bits per layer on the Pareto front of {study.study_name!r} (as run; hover: "
        "kernel)",
        yaxis={"autorange": "reversed"},
    )
    fig.write_html(html, include_plotlyjs=True)


def _empty_png(path: Path, message: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 1.5))
    ax.text(0.5, 0.5, message, ha="center", va="center")
    ax.axis("off")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(study: optuna.Study, out: Path, min_success: float | None = None) -> list[Path]:
    """The plots into ``out`` (created): the front (PNG, HTML) and the bit map (PNG, HTML)."""
    out.mkdir(parents=True, exist_ok=True)
    df = front_frame(study)
    plot_front_html(df, out / "pareto_front.html", study, min_success)
    plot_front_png(df, out / "pareto_front.png", study, min_success)
    plot_bit_map(study, out / "bit_map.html", out / "bit_map.png")
    return [
        out / n for n in ("pareto_front.png", "pareto_front.html", "bit_map.png", "bit_map.html")
    ]
