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


def confusion(true, predicted, num_classes: int, path: str, title: str = "test confusion matrix") -> None:
    """The ``num_classes`` x ``num_classes`` confusion matrix (rows: true class, columns:
    predicted), each cell annotated with its count, as a PNG."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    true, predicted = np.asarray(true, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (true, predicted), 1)
    fig = Figure(figsize=(6, 5.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    dark = counts.max() / 2
    for i in range(num_classes):
        for j in range(num_classes):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if counts[i, j] > dark else "black")
    ticks = list(range(num_classes))
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true",
           title=f"{title} ({int(np.trace(counts))}/{len(true)} right)")
    fig.savefig(path, dpi=100)


def misclassified(images, true, predicted, path: str, size: int = 8, columns: int = 10,
                  limit: int = 50) -> None:
    """Up to ``limit`` images (rows of ``size * size`` pixels) in a grid, each titled
    ``true -> predicted``, as a PNG; a figure that says so when there are none. One canvas
    with text over it, not an axes per image (50 axes take seconds to lay out)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    images = np.asarray(images, dtype=np.float64)[:limit].reshape(-1, size, size)
    n = len(images)
    rows = max(1, -(-n // columns))
    pad = size // 2  # the room for each title, in pixels of the image
    cell_w, cell_h = size + 2, size + pad + 1
    canvas = np.full((rows * cell_h, columns * cell_w), np.nan)
    low, high = (images.min(), images.max()) if n else (0.0, 1.0)
    fig = Figure(figsize=(1.0 * columns, 1.25 * rows + 0.4))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1 - 0.4 / (1.25 * rows + 0.4)))
    for i, (image, t, p) in enumerate(zip(images, true, predicted)):
        r, c = divmod(i, columns)
        top, left = r * cell_h + pad, c * cell_w + 1
        canvas[top:top + size, left:left + size] = image
        ax.text(left + size / 2 - 0.5, top - 1, f"{int(t)} -> {int(p)}", ha="center", va="bottom", fontsize=9)
    ax.imshow(canvas, cmap="gray_r", vmin=low, vmax=high, interpolation="nearest")
    ax.set_axis_off()
    fig.suptitle(f"misclassified test images: {len(true)} ({n} shown), true -> predicted" if n
                 else "no misclassified test images", y=0.995, va="top")
    fig.savefig(path, dpi=100)
