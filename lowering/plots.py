"""The report's pictures of the folds (PNG, matplotlib without pyplot's global state).

For smoothquant, two figures: per layer, weight SQNR and quantized output error without and
with the fold; and the per-channel activation maximum of one group's input before and after
smoothing, for the group whose input had the strongest outliers (largest max / median). For
rotation, the per-channel maximum of the quantized input with the strongest outliers before
and after rotating. These are the pictures that show whether the outliers were tamed.
"""
from __future__ import annotations

from pathlib import Path

LAYERS_PNG = "folds_layers.png"
CHANNELS_PNG = "folds_channels.png"
ROTATION_PNG = "rotation_channels.png"


def write_fold_plots(folder: Path, groups: list[dict]) -> list[str]:
    """Write the two PNGs into `folder` (the artifact's scratch directory, published with the
    rest); return their file names."""
    _layers_figure(groups).savefig(folder / LAYERS_PNG, dpi=110)
    _channels_figure(groups).savefig(folder / CHANNELS_PNG, dpi=110)
    return [LAYERS_PNG, CHANNELS_PNG]


def write_rotation_plot(folder: Path, channel_max: dict) -> list[str]:
    """Write ROTATION_PNG from the rotation pass's `channel_max` record; return its name."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    ax.semilogy(channel_max["before"], ".", markersize=3, label="before rotation")
    ax.semilogy(channel_max["after"], ".", markersize=3, label="after")
    ax.set_xlabel("input channel")
    ax.set_ylabel("max |activation| (first calibration tokens)")
    ax.set_title(f"Input of {channel_max['layer']}", fontsize=8)
    ax.legend()
    fig.savefig(folder / ROTATION_PNG, dpi=110)
    return [ROTATION_PNG]


def _layers_figure(groups: list[dict]):
    from matplotlib.figure import Figure

    layers = {name: figures for g in groups for name, figures in g["layers"].items()}
    names = list(layers)
    x = range(len(names))
    fig = Figure(figsize=(max(6.0, 0.28 * len(names) + 2), 6.5), layout="constrained")
    sqnr_ax, error_ax = fig.subplots(2, 1, sharex=True)
    for i, (label, style) in enumerate((("without the fold", "o"), ("with the fold", "x-"))):
        sqnr = [layers[n]["weight_sqnr_db"][i] for n in names]
        sqnr_ax.plot(x, [float("nan") if v is None else v for v in sqnr], style, label=label)
        error_ax.semilogy(x, [layers[n]["error"][i] for n in names], style, label=label)
    sqnr_ax.set_ylabel("weight SQNR (dB)")
    error_ax.set_ylabel("output error (relative MSE)")
    error_ax.set_xticks(list(x), names, rotation=90, fontsize=6)
    sqnr_ax.legend()
    sqnr_ax.set_title("Quantized layers of the smoothquant groups")
    return fig


def _channels_figure(groups: list[dict]):
    from matplotlib.figure import Figure

    group = max(groups, key=_outlier_ratio)
    before, after = group["channel_max"]
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    ax.semilogy(before, ".", markersize=3, label="before smoothing")
    ax.semilogy(after, ".", markersize=3, label=f"after (alpha {group['alpha']})")
    ax.set_xlabel(f"channel of {group['producer']}")
    ax.set_ylabel("max |activation| at the consumers' input")
    ax.set_title(f"Input of {', '.join(group['consumers'])}", fontsize=8)
    ax.legend()
    return fig


def _outlier_ratio(group: dict) -> float:
    values = sorted(v for v in group["channel_max"][0] if v > 0)
    return values[-1] / values[len(values) // 2] if values else 0.0
