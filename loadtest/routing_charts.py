"""`prefix-router bench routing-report JSON...`: the README's routing tables and trade-off chart.

Reads the JSON files `bench routing` wrote and prints one markdown table per file (hit rate
against the pooled-capacity reference, TTFT p50/p99, imbalance, errors, per router), then draws
one PNG: hit rate against TTFT p99, a point per router, a panel per file, so routers are compared
the way people compare them, by looking. Nothing is measured here; it only re-presents a run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def markdown_table(data: dict[str, Any]) -> str:
    lines = [
        f"**{data['workload']}**: {data['description']}; {data['workers']} workers x "
        f"{data['kv_blocks_per_worker']} KV blocks, intrinsic {data['intrinsic_reuse']:.3f}, "
        f"pooled-capacity reference {data.get('pooled_reference', 0.0):.3f}",
        "",
        "| router | hit % | / pooled | TTFT p50 ms | TTFT p99 ms | E2E p99 ms | imbalance"
        " | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['policy']} | {100 * r['hit_rate']:.1f} | {r.get('of_pooled', 0.0):.2f} | "
            f"{r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.0f} | {r['e2e_p99_ms']:.0f} | "
            f"{r['imbalance']:.2f} | {r['errors']} |"
        )
    return "\n".join(lines)


def write_tradeoff_chart(path: str, runs: list[dict[str, Any]], titles: list[str]) -> None:
    cols = min(3, len(runs))
    rows = -(-len(runs) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.5 * rows), squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(runs) :]:
        ax.set_visible(False)
    for ax, data, title in zip(axes, runs, titles, strict=False):
        for r in data["rows"]:
            ours = r["policy"] in ("hybrid", "prefix", "round_robin", "least_load")
            ax.scatter(r["ttft_p99_ms"], 100 * r["hit_rate"], marker="o" if ours else "s")
            ax.annotate(r["policy"], (r["ttft_p99_ms"], 100 * r["hit_rate"]), fontsize=8)
        pooled = data.get("pooled_reference")
        if pooled:
            ax.axhline(100 * pooled, color="black", linestyle="--", linewidth=0.8)
            ax.annotate(
                "pooled-capacity reference",
                (ax.get_xlim()[1], 100 * pooled),
                fontsize=7,
                ha="right",
                va="bottom",
            )
        ax.set_title(f"{title} ({data['workers']} workers)", fontsize=9)
        ax.set_xlabel("TTFT p99 (ms), lower is better")
        ax.set_ylabel("fleet prefix-cache hit %, higher is better")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefix-router bench routing-report", description=__doc__)
    parser.add_argument("json", nargs="+", help="files written by `bench routing`")
    parser.add_argument("--png", default="docs/img/routing-tradeoff.png")
    args = parser.parse_args(argv)
    runs = [json.loads(Path(p).read_text()) for p in args.json]
    for data in runs:
        print(markdown_table(data) + "\n")
    write_tradeoff_chart(args.png, runs, [Path(p).stem for p in args.json])
    print(f"wrote {args.png}")
    return 0
