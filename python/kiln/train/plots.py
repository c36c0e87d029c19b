"""The plots every run writes. Figures are drawn on matplotlib's Agg canvas directly, so
nothing here touches pyplot's global backend (a user's notebook keeps its own)."""

from __future__ import annotations


def curves(history: list[dict], metric_key: str | None, path: str) -> None:
    """Loss (train and validation) and the task's metric per epoch, side by side, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, metric_ax = fig.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        values = [row.get(key) for row in history]
        if any(v is not None for v in values):
            loss_ax.plot(epochs, values, marker=".", label=label)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    loss_ax.set_yscale("log")
    loss_ax.legend()
    if metric_key is not None and any(metric_key in row for row in history):
        metric_ax.plot(epochs, [row.get(metric_key) for row in history], marker=".", color="C1")
        metric_ax.set(xlabel="epoch", ylabel=metric_key, title=metric_key)
    else:
        metric_ax.set_axis_off()
    fig.savefig(path, dpi=100)
