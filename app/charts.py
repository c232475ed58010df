"""Plotly figures of the dashboard, built from the engine's tables (no computation here beyond layout)."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

PALETTE = px.colors.qualitative.Safe
# The legend sits right of the plot: above it, a legend title collided with the chart title.
LAYOUT = dict(
    template="plotly_white",
    margin=dict(l=50, r=20, t=60, b=40),
    legend=dict(orientation="v", x=1.01, y=1, xanchor="left", yanchor="top"),
)
VALUE_LABELS_UP_TO = 40  # layers; beyond that per-bar labels would overlap


def ratio_histogram(
    table: pd.DataFrame, title: str, threshold: float | None = None, flagged: list[str] | None = None
) -> go.Figure:
    """One bar per layer in network order, coloured by stage (paper Fig. 3d-h); optional bottleneck threshold."""
    data = table.assign(label=[f"{d}: {n}" for d, n in zip(table.depth, table.layer)])
    fig = px.bar(
        data,
        x="label",
        y="pruning_ratio",
        color="stage",
        color_discrete_sequence=PALETTE,
        hover_data={
            "label": False,
            "layer": True,
            "kept": True,
            "channels": True,
            "params_after": ":,",
            "params_before": ":,",
            "macs_after": ":,",
            "macs_before": ":,",
            "pruning_ratio": ":.1%",
        },
        labels={
            "pruning_ratio": "pruned channels (share of the layer's structures)",
            "label": "layer (network order)",
        },
        title=title,
    )
    top = 1.2 if flagged else 1.1  # room for the bottleneck markers above every bar label
    fig.update_layout(
        **LAYOUT,
        yaxis_tickformat=".0%",
        yaxis_range=[0, top],
        yaxis_tickvals=[0, 0.2, 0.4, 0.6, 0.8, 1.0],  # no tick above 100 % in the markers' row
        xaxis_tickangle=-60,
    )
    if len(data) <= VALUE_LABELS_UP_TO:  # also makes 0 % layers visible: their label sits on the axis
        fig.update_traces(texttemplate="%{y:.0%}", textposition="outside", cliponaxis=False)
    if threshold is not None:  # a legend entry, not an annotation that would sit on the bars
        fig.add_trace(
            go.Scatter(
                x=[data.label.iloc[0], data.label.iloc[-1]],
                y=[threshold, threshold],
                mode="lines",
                name=f"bottleneck threshold {threshold:.0%}",
                line=dict(dash="dash", color="#c0392b"),
                hoverinfo="skip",
            )
        )
    if flagged:
        marked = data[data.layer.isin(flagged)]
        fig.add_trace(
            go.Scatter(
                x=marked.label,
                y=[1.14] * len(marked),  # one row above the plot's bars and their labels
                mode="markers",
                name="bottleneck",
                marker=dict(symbol="triangle-down", size=12, color="#c0392b"),
                hovertemplate="%{x}: flagged as a bottleneck<extra></extra>",
            )
        )
    return fig


def width_profile(table: pd.DataFrame, title: str) -> go.Figure:
    """Channels per layer before and after pruning (the kept-width profile)."""
    labels = [f"{d}: {n}" for d, n in zip(table.depth, table.layer)]
    fig = go.Figure(
        [
            go.Bar(x=labels, y=table.channels, name="before", marker_color="#b0c4de"),
            go.Bar(x=labels, y=table.kept, name="kept", marker_color="#2f6fb0"),
        ]
    )
    fig.update_layout(
        **LAYOUT,
        barmode="overlay",
        title=title,
        yaxis_title="channels",
        xaxis_title="layer (network order)",
        xaxis_tickangle=-60,
    )
    return fig


def _stage_colours(table: pd.DataFrame) -> list[str]:
    stages = list(dict.fromkeys(table.stage))
    return [PALETTE[stages.index(st) % len(PALETTE)] for st in table.stage]


def compare_overlay(table: pd.DataFrame, name_a: str, name_b: str) -> go.Figure:
    """Both analyses' layer-wise ratios as grouped bars."""
    labels = [f"{d}: {n}" for d, n in zip(table.depth, table.layer)]
    fig = go.Figure(
        [
            go.Bar(x=labels, y=table.ratio_a, name=name_a, marker_color="#2f6fb0"),
            go.Bar(x=labels, y=table.ratio_b, name=name_b, marker_color="#e67e22"),
        ]
    )
    fig.update_layout(
        **LAYOUT,
        barmode="group",
        title="Layer-wise pruning ratios",
        yaxis_tickformat=".0%",
        xaxis_tickangle=-60,
        xaxis_title="layer (network order)",
        yaxis_title="pruned channels (share of the layer)",
    )
    return fig


def difference_bars(table: pd.DataFrame, name_a: str, name_b: str) -> go.Figure:
    """Per-layer ratio difference (b - a) in percentage points, with the masks' Jaccard overlap on hover."""
    labels = [f"{d}: {n}" for d, n in zip(table.depth, table.layer)]
    points = table.ratio_difference * 100
    fig = go.Figure()
    for sign, name, colour in (
        (1, f"{name_b} prunes more", "#e67e22"),
        (-1, f"{name_a} prunes more", "#2f6fb0"),
    ):
        rows = (points > 0) if sign > 0 else (points <= 0)
        fig.add_trace(
            go.Bar(
                x=[l for l, r in zip(labels, rows) if r],
                y=points[rows],
                name=name,
                marker_color=colour,
                customdata=table.loc[rows, ["jaccard"]].to_numpy(),
                hovertemplate="%{x}<br>difference %{y:.1f} pp<br>Jaccard %{customdata[0]:.2f}<extra></extra>",
            )
        )
    fig.update_layout(
        **LAYOUT,
        title=f"Ratio difference: {name_b} minus {name_a}",
        xaxis_tickangle=-60,
        xaxis_title="layer (network order)",
        yaxis_title="difference (percentage points)",
        xaxis_categoryorder="array",
        xaxis_categoryarray=labels,
    )
    return fig


def side_by_side(table: pd.DataFrame, name_a: str, name_b: str) -> go.Figure:
    """The two profiles in two panels, bars coloured by stage, layers labelled."""
    from plotly.subplots import make_subplots

    labels = [f"{d}: {n}" for d, n in zip(table.depth, table.layer)]
    colours = _stage_colours(table)
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, subplot_titles=(name_a, name_b))
    fig.add_trace(go.Bar(x=labels, y=table.ratio_a, marker_color=colours, showlegend=False), 1, 1)
    fig.add_trace(go.Bar(x=labels, y=table.ratio_b, marker_color=colours, showlegend=False), 1, 2)
    for stage in dict.fromkeys(table.stage):  # a legend entry per stage colour
        fig.add_trace(
            go.Bar(x=[None], y=[None], name=stage, marker_color=colours[list(table.stage).index(stage)]), 1, 1
        )
    fig.update_layout(
        **LAYOUT,
        title="Profiles side by side (colour: stage)",
        yaxis_tickformat=".0%",
        yaxis_title="pruned channels (share of the layer)",
    )
    fig.update_xaxes(tickangle=-60, title_text="layer (network order)")
    return fig


def saliency_scatter(frame: pd.DataFrame, layer: str) -> go.Figure:
    """One layer's structures: rank by SOSP saliency against rank by captum's first-order attribution; on the
    diagonal both agree, off it the second-order terms moved a channel."""
    fig = px.scatter(
        frame,
        x="attribution_rank",
        y="sosp_rank",
        color="status",
        hover_data=["structure", "sosp_saliency", "first_order_attribution"],
        color_discrete_map={"pruned": "#c0392b", "kept": "#2f6fb0"},
        title=f"{layer}: rank by second-order saliency vs rank by first-order attribution",
        labels={
            "attribution_rank": "rank by |gradient x activation| (captum), 1 = least",
            "sosp_rank": "rank by SOSP saliency, 1 = least",
            "status": "at this ratio",
        },
    )
    top = float(len(frame)) + 0.5
    fig.add_trace(
        go.Scatter(
            x=[0.5, top], y=[0.5, top], mode="lines", name="same rank", line=dict(color="#999", dash="dash")
        )
    )
    fig.update_layout(**LAYOUT)
    return fig


def _padded(low: float, high: float, pad: float, floor: float | None = None) -> list[float]:
    """An axis range around [low, high] that never collapses to a sliver and keeps the end markers inside."""
    span = max(high - low, pad)
    lo, hi = low - 0.15 * span, high + 0.15 * span
    return [max(lo, floor) if floor is not None else lo, hi]


def accuracy_vs_size(
    table: pd.DataFrame, size: str = "params", reference: tuple[float, float] | None = None
) -> go.Figure:
    """Mean test accuracy over trials against parameters or MACs, with std error bars (paper Fig. 4b/e); `reference`
    is the unpruned plain net (size, accuracy)."""
    label = {"params": "parameters", "macs": "MACs per sample"}[size]
    fig = go.Figure()
    for i, row in table.reset_index(drop=True).iterrows():
        trials = int(row.trials)
        fig.add_trace(
            go.Scatter(
                x=[row[f"{size}_mean"]],
                y=[row.test_acc_mean],
                name=f"{row.label}{f' [{row.setup}]' if row.get('setup') else ''} "
                f"({trials} trial{'s' if trials != 1 else ''})",
                mode="markers",
                marker=dict(size=12, color=PALETTE[i % len(PALETTE)]),
                error_y=dict(type="data", array=[row.test_acc_std], visible=True),
                error_x=dict(type="data", array=[row.get(f"{size}_std", 0.0)], visible=True),
            )
        )
    xs = list(table[f"{size}_mean"])
    accs = list(table.test_acc_mean - table.test_acc_std) + list(table.test_acc_mean + table.test_acc_std)
    if reference is not None:
        fig.add_trace(
            go.Scatter(
                x=[reference[0]],
                y=[reference[1]],
                name="unpruned plain net",
                mode="markers",
                marker=dict(size=14, symbol="star", color="#555"),
            )
        )
        xs.append(reference[0])
        accs.append(reference[1])
    fig.update_layout(
        **LAYOUT,
        title=f"Test accuracy vs {label}",
        xaxis_title=label,
        yaxis_title="test accuracy",
        yaxis_tickformat=".1%",
        xaxis_tickformat=",.0f",
        yaxis_range=_accuracy_range(accs),
        xaxis_range=_padded(min(xs), max(xs), 0.02 * max(max(xs), 1), floor=0.0),
    )
    return fig


def training_curves(metrics: pd.DataFrame, title: str) -> go.Figure:
    """Validation accuracy per epoch and stage of a job (stages without a validation accuracy get no panel)."""
    metrics = metrics.dropna(subset=["val_acc"])
    fig = px.line(
        metrics,
        x="epoch",
        y="val_acc",
        color="stage",
        facet_col="stage",
        markers=True,
        title=title,
        labels={"val_acc": "validation accuracy"},
    )  # one panel per stage: each counts its own epochs
    fig.update_layout(**LAYOUT)
    fig.update_yaxes(tickformat=".0%", range=[0, 1.02])  # an accuracy, whatever the points: never below 0 %
    fig.update_xaxes(tickformat="d", matches=None, rangemode="tozero")
    fig.for_each_annotation(lambda a: a.update(text=a.text.removeprefix("stage=")))
    if metrics.epoch.max() <= 20:
        fig.update_xaxes(dtick=1)
    return fig


def sensitivity_lines(
    tables: dict[str, pd.DataFrame], metric: str, unit: str, marker: float | None = None
) -> go.Figure:
    """Measured accuracy or loss of the physically pruned net against the global ratio, one line per analysis."""
    label = {"pruned_acc": "validation accuracy (pruned net)", "pruned_loss": "validation loss (pruned net)"}[
        metric
    ]
    fig = go.Figure()
    for i, (name, table) in enumerate(tables.items()):
        fig.add_trace(
            go.Scatter(
                x=table.ratio,
                y=table[metric],
                name=name,
                mode="lines+markers",
                line=dict(color=PALETTE[i % len(PALETTE)]),
                customdata=table[["pruned_structures", "params", "macs"]],
                hovertemplate="ratio %{x:.1%}<br>%{y:.4g}<br>%{customdata[0]} structures pruned"
                "<br>%{customdata[1]:,} params, %{customdata[2]:,} MACs<extra></extra>",
            )
        )
    if marker is not None:
        fig.add_vline(x=marker, line_dash="dash", line_color="#555", annotation_text="slider")
    fig.update_layout(
        **LAYOUT,
        title=f"{label.split(' (')[0].capitalize()} against the pruning ratio",
        xaxis_title=f"global pruning ratio ({unit})",
        yaxis_title=label,
        xaxis_tickformat=".0%",
        yaxis_tickformat=".0%" if metric == "pruned_acc" else None,
    )
    return fig


def predicted_vs_measured(tables: dict[str, pd.DataFrame], correlations: dict[str, float]) -> go.Figure:
    """Predicted against measured loss increase per grid point; the title gives each analysis's rank correlation
    along its order (near 1 by construction: both grow with the prefix)."""
    fig = go.Figure()
    for i, (name, table) in enumerate(tables.items()):
        fig.add_trace(
            go.Scatter(
                x=table.predicted_increase,
                y=table.measured_increase,
                mode="markers+lines",
                name=name,
                line=dict(color=PALETTE[i % len(PALETTE)]),
                customdata=table[["ratio"]],
                hovertemplate="ratio %{customdata[0]:.1%}<br>predicted %{x:.4g}<br>measured %{y:.4g}"
                "<extra></extra>",
            )
        )
    fig.update_layout(
        **LAYOUT,
        title="Predicted vs measured loss increase along the order (Spearman "
        + "; ".join(f"{name}: {rho:.2f}" for name, rho in correlations.items())
        + ")",
        xaxis_title="predicted loss increase",
        yaxis_title="measured loss increase (zero-masked net)",
    )
    return fig


def trust_scatter(reports: dict) -> go.Figure:
    """Each independent mask: the method's score against the measured loss increase; the title gives the scores."""
    fig = go.Figure()
    for i, (name, report) in enumerate(reports.items()):
        fig.add_trace(
            go.Scatter(
                x=report.scores,
                y=report.measured,
                mode="markers",
                name=name,
                marker=dict(color=PALETTE[i % len(PALETTE)]),
                hovertemplate="score %{x:.4g}<br>measured %{y:.4g}<extra></extra>",
            )
        )
    scores = "; ".join(f"{name}: {report.score:.2f}" for name, report in reports.items())
    fig.update_layout(
        **LAYOUT,
        title=f"Ranking of {next(iter(reports.values())).masks} masks of one size (Spearman, mean of 2 families: "
        f"{scores})",
        xaxis_title="method's score of the mask (sum of its saliencies)",
        yaxis_title="measured loss increase (zero-masked net)",
    )
    return fig


def calibration_chart(reports: dict) -> go.Figure:
    """Predicted / measured loss increase along each order, with the band where the prediction holds."""
    factor = next(iter(reports.values())).factor
    fig = go.Figure()
    for i, (name, report) in enumerate(reports.items()):
        rows = [c for c in report.calibration if c["predicted_over_measured"]]
        fig.add_trace(
            go.Scatter(
                x=[c["ratio"] for c in rows],
                y=[c["predicted_over_measured"] for c in rows],
                mode="markers+lines",
                name=name,
                line=dict(color=PALETTE[i % len(PALETTE)]),
            )
        )
    fig.add_hrect(y0=1 / factor, y1=factor, fillcolor="#2e7d32", opacity=0.12, line_width=0)
    fig.add_hline(y=1, line_dash="dot", line_color="#555")
    fig.update_layout(
        **LAYOUT,
        title=f"Calibration: predicted / measured loss increase (shaded: within {factor:g}x)",
        xaxis_title="pruned structures (share of all)",
        yaxis_title="predicted / measured (log scale)",
        xaxis_tickformat=".0%",
        yaxis_type="log",
    )
    return fig


def study_accuracy(table: pd.DataFrame, size: str, accuracy: str, unit: str) -> go.Figure:
    """Mean accuracy against the remaining params or MACs per method, with std error bars over seeds (paper Tab. 1)."""
    size_label = {"params": "remaining parameters", "macs": "remaining MACs per sample"}[size]
    acc_label = {
        "acc_finetuned": "test accuracy after fine-tuning",
        "acc_pruned": "test accuracy right after pruning",
    }
    fig = go.Figure()
    for i, (method, rows) in enumerate(table.groupby("method", sort=False)):
        rows = rows.sort_values(f"{size}_mean")
        fig.add_trace(
            go.Scatter(
                x=rows[f"{size}_mean"],
                y=rows[f"{accuracy}_mean"],
                mode="lines+markers",
                name=method,
                line=dict(color=PALETTE[i % len(PALETTE)]),
                error_y=dict(type="data", array=rows[f"{accuracy}_std"], visible=True),
                customdata=rows[["target", "seeds"]],
                hovertemplate=f"target %{{customdata[0]:.0%}} of {unit}<br>%{{y:.1%}}<br>%{{x:,.0f}}<br>"
                "%{customdata[1]} seeds<extra></extra>",
            )
        )
    spread = table[f"{accuracy}_std"].fillna(0.0)
    accs = list(table[f"{accuracy}_mean"] - spread) + list(table[f"{accuracy}_mean"] + spread)
    xs = list(table[f"{size}_mean"])
    fig.update_layout(
        **LAYOUT,
        title=f"{acc_label[accuracy].capitalize()} against {size_label}",
        xaxis_title=size_label,
        yaxis_title=acc_label[accuracy],
        yaxis_tickformat=".0%",
        xaxis_tickformat=",.0f",
        yaxis_range=_accuracy_range(accs),
        xaxis_range=_padded(min(xs), max(xs), 0.02 * max(max(xs), 1), floor=0.0),
    )
    return fig


def _accuracy_range(accs: list[float]) -> list[float]:
    """An accuracy axis around the values, never below 0 % or above 100 % (a single point must not stretch it)."""
    low, high = _padded(min(accs), min(max(accs), 1.0), 0.02, floor=0.0)
    return [low, min(high, 1.0 + 0.005)]


def ratio_profiles_chart(table: pd.DataFrame, names: list[str], title: str) -> go.Figure:
    """Several analyses' layer-wise pruning ratios as grouped bars in network order."""
    labels = [f"{d}: {n}" for d, n in zip(table.depth, table.layer)]
    fig = go.Figure(
        [
            go.Bar(x=labels, y=table[name], name=name, marker_color=PALETTE[i % len(PALETTE)])
            for i, name in enumerate(names)
        ]
    )
    fig.update_layout(
        **LAYOUT,
        barmode="group",
        title=title,
        yaxis_tickformat=".0%",
        xaxis_tickangle=-60,
        xaxis_title="layer (network order)",
        yaxis_title="pruned channels (share of the layer)",
    )
    return fig


def efficiency_chart(table: pd.DataFrame) -> go.Figure:
    """Measured latency drop against MAC drop along each order, one line per order, runtime and batch; the diagonal
    is where every saved MAC would be saved time."""
    fig = go.Figure()
    groups = list(table.groupby(["order", "runtime", "batch"], sort=False))
    for i, ((order, runtime, batch), rows) in enumerate(groups):
        rows = rows.sort_values("mac_drop")
        fig.add_trace(
            go.Scatter(
                x=[0.0] + rows["mac_drop"].tolist(),
                y=[0.0] + rows["latency_drop"].tolist(),
                mode="markers+lines",
                name=f"{runtime}, batch {batch}, {order}",
                line=dict(
                    color=PALETTE[i % len(PALETTE)], dash="solid" if order == "as analysed" else "dash"
                ),
                customdata=[[0, float("nan")]] + rows[["structures_pruned", "efficiency"]].values.tolist(),
                hovertemplate="MAC drop %{x:.1%}<br>latency drop %{y:.1%}<br>%{customdata[0]} structures"
                "<br>efficiency %{customdata[1]:.2f}<extra></extra>",
            )
        )
    fig.add_trace(
        go.Scatter(
            x=[0, 1], y=[0, 1], mode="lines", name="latency follows MACs", line=dict(color="#888", dash="dot")
        )
    )
    fig.update_layout(
        **LAYOUT,
        title="What the masks buy: measured latency drop against MAC drop",
        xaxis_title="MAC drop (share of the unpruned net's)",
        yaxis_title="latency drop (share of the unpruned net's)",
        xaxis_tickformat=".0%",
        yaxis_tickformat=".0%",
        xaxis_range=[0, 1],
        yaxis_range=[min(0.0, float(table["latency_drop"].min()) - 0.05), 1],
    )
    return fig


def latency_profile_chart(profile, chosen: int, target: float) -> go.Figure:
    """The measured latency profile (relative to the unpruned net, error bars at twice each point's standard error),
    the target line and the chosen mask's measured point."""
    errors = [2 * e for e in profile.errors] if len(profile.errors) == len(profile.relative) else None
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=profile.prefixes,
            y=profile.relative,
            mode="markers+lines",
            name="measured",
            line=dict(color=PALETTE[0]),
            error_y=dict(type="data", array=errors, visible=errors is not None),
            hovertemplate="%{x} structures pruned<br>latency %{y:.3f} of the unpruned net's<extra></extra>",
        )
    )
    if chosen in profile.prefixes:
        at = profile.prefixes.index(chosen)
        fig.add_trace(
            go.Scatter(
                x=[chosen],
                y=[profile.relative[at]],
                mode="markers",
                name="the mask at the target",
                marker=dict(color=PALETTE[1], size=13, symbol="diamond"),
                error_y=dict(type="data", array=[errors[at]] if errors else None, visible=errors is not None),
            )
        )
    fig.add_hline(
        y=1 - target, line=dict(color="#888", dash="dot"), annotation_text=f"target: {target:.0%} faster"
    )
    fig.update_layout(
        **LAYOUT,
        title="Latency along the pruning order, as measured",
        xaxis_title="structures pruned (a prefix of the order)",
        yaxis_title="latency relative to the unpruned net",
    )
    return fig
