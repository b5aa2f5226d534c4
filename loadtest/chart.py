"""The policy benchmark's PNG: one figure per workload, a panel per headline metric.

Panels: fleet hit rate against the intrinsic reuse, TTFT p50/p90/p99, E2E p50/p99 and load
imbalance, one bar (group) per policy. matplotlib's Agg backend, so it runs headless.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def write_chart(path: str, title: str, rows: list[dict[str, Any]], intrinsic: float) -> None:
    names = [r["policy"] for r in rows]
    xs = list(range(len(rows)))
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    fig.suptitle(title, fontsize=10)

    hit = axes[0]
    hit.bar(xs, [r["hit_rate"] for r in rows], color="tab:blue")
    hit.axhline(intrinsic, color="black", linestyle="--", label=f"intrinsic {intrinsic:.3f}")
    hit.set_title("fleet prefix-cache hit rate")
    hit.set_ylim(0, 1)
    hit.legend(loc="lower right", fontsize=8)

    _grouped(axes[1], xs, rows, ["ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms"], "TTFT (ms)")
    _grouped(axes[2], xs, rows, ["e2e_p50_ms", "e2e_p99_ms"], "E2E latency (ms)")

    imb = axes[3]
    imb.bar(xs, [r["imbalance"] for r in rows], color="tab:red")
    imb.axhline(1.0, color="black", linewidth=0.8)
    imb.set_title("load imbalance (max/mean requests)")

    for ax in axes:
        ax.set_xticks(xs)
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def _grouped(
    ax: Any, xs: list[int], rows: list[dict[str, Any]], keys: list[str], title: str
) -> None:
    width = 0.8 / len(keys)
    for n, key in enumerate(keys):
        offset = (n - (len(keys) - 1) / 2) * width
        label = key.split("_")[1]
        ax.bar([x + offset for x in xs], [r[key] for r in rows], width, label=label)
    ax.set_title(title)
    ax.legend(fontsize=8)
