"""``OUT/loss.png``: training loss (raw and smoothed) and learning rate against the step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from llavamed.utils.io import atomic_path


def ema(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def plot_loss(metrics: Sequence[dict], path: str | Path, title: str = "") -> Path | None:
    rows = [m for m in metrics if "loss" in m and "step" in m]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in rows]
    loss = [m["loss"] for m in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=1, label="loss")
    ax.plot(steps, ema(loss), color="tab:blue", lw=2, label="loss (EMA 0.1)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over supervised tokens)")
    ax.grid(alpha=0.3)
    if any("lr" in m for m in rows):
        ax2 = ax.twinx()
        ax2.plot(steps, [m.get("lr", 0.0) for m in rows], color="tab:orange", lw=1, label="lr")
        ax2.set_ylabel("learning rate", color="tab:orange")
    ax.legend(loc="upper right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
