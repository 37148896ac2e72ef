"""Plots saved beside every exported model (PNG, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_training_curves(history: dict[str, list[float]], path: Path, title: str) -> Path:
    """One panel per metric family (``loss``/``val_loss``, ``accuracy``/``val_accuracy``, ...)."""
    families = sorted({k.removeprefix("val_") for k in history if k != "learning_rate"})
    fig, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 3.5), squeeze=False)
    for ax, family in zip(axes[0], families, strict=True):
        for key in (family, f"val_{family}"):
            if key in history:
                ax.plot(range(1, len(history[key]) + 1), history[key], label=key)
        ax.set_xlabel("epoch")
        ax.set_title(family)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
