"""Figures: the per-op memory timeline of a training step (like the paper's memory figure), experiment bar charts."""

from __future__ import annotations

KINDS = ("input", "activation", "mask", "gradient", "weight_gradient", "workspace")


def plot_memory_timeline(plans: dict, path: str, title: str) -> None:
    """Stacked bytes alive per op for one or more plans (label -> MemoryPlan), trainable params as a base."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(plans), 1, figsize=(10, 3.2 * len(plans)), squeeze=False, sharey=True)
    for ax, (label, plan) in zip(axes[:, 0], plans.items()):
        xs = [row["index"] for row in plan.timeline]
        base = [plan.trainable_param_bytes / 1024] * len(xs)
        layers = [base] + [[row[k] / 1024 for row in plan.timeline] for k in KINDS]
        ax.stackplot(xs, *layers, labels=["trainable params"] + [k.replace("_", " ") for k in KINDS], alpha=0.85)
        ax.axhline(plan.peak_sram_bytes / 1024, color="k", lw=0.8, ls="--")
        ax.set_title(f"{label}: peak SRAM {plan.peak_sram_bytes / 1024:.0f} KB (arena {plan.arena_bytes / 1024:.0f} KB)")
        ax.set_ylabel("KB")
    axes[-1, 0].set_xlabel("op in execution order")
    axes[0, 0].legend(loc="upper right", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grouped_bars(groups: dict, path, title: str, ylabel: str) -> None:
    """One bar group per key of ``groups`` (label -> per-seed values): bar = mean, whisker = min..max, dots = seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(dict.fromkeys(label for g in groups.values() for label in g))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(2.2 + 1.2 * len(groups) * len(labels) * 0.5, 3.8))
    for j, label in enumerate(labels):
        for i, g in enumerate(groups.values()):
            if label not in g:
                continue
            v = np.asarray(g[label], float)
            x = i + (j - (len(labels) - 1) / 2) * width
            ax.bar(x, v.mean(), width * 0.9, color=f"C{j}", label=label if label not in ax.get_legend_handles_labels()[1] else None,
                   yerr=[[v.mean() - v.min()], [v.max() - v.mean()]], capsize=3)
            ax.plot([x] * len(v), v, "k.", ms=3)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
