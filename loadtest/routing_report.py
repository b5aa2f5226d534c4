"""The policy benchmark's table and acceptance lines (routing issue, point 6), from its rows.

"Best peer" is taken per criterion, as the issue defines it: the highest hit rate of any external
router, the lowest TTFT p50 of any, the lowest p99 of any. Rows of the gateway's own policies
other than `hybrid` are baselines, not peers.
"""

from __future__ import annotations

from typing import Any

COLUMNS = [
    ("policy", "router"),
    ("hit_rate", "hit rate"),
    ("of_intrinsic", "/intrinsic"),
    ("of_pooled", "/pooled"),
    ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_p90_ms", "p90"),
    ("ttft_p99_ms", "p99"),
    ("e2e_p50_ms", "E2E p50 ms"),
    ("e2e_p99_ms", "p99"),
    ("output_tok_s", "out tok/s"),
    ("imbalance", "imbalance"),
    ("errors", "errors"),
    ("cpu_share", "CPU"),
    ("machine_busy", "host CPU"),
    ("router_cpu_ms_per_request", "router CPU ms/req"),
    ("decision_p99_us", "decision p99 us"),
]


def add_ratios(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        r["of_intrinsic"] = r["hit_rate"] / r["intrinsic"] if r["intrinsic"] else 0.0
        r["of_pooled"] = r["hit_rate"] / r["pooled"] if r["pooled"] else 0.0


def check_acceptance(rows: list[dict[str, Any]], peers: set[str]) -> list[str]:
    """Printable lines comparing `hybrid` with the best peer and the pooled reference."""
    by = {r["policy"]: r for r in rows}
    hybrid = by.get("hybrid")
    if hybrid is None:
        return []
    lines = [
        f"hybrid hit {hybrid['hit_rate']:.3f} = {hybrid['of_pooled']:.2f} x pooled-capacity "
        f"reference {hybrid['pooled']:.3f} (target >= 1.00), {hybrid['of_intrinsic']:.0%} of "
        f"intrinsic",
        f"hybrid imbalance {hybrid['imbalance']:.2f} (target <= 1.3), errors {hybrid['errors']}",
    ]
    rivals = [r for r in rows if r["policy"] in peers]
    if rivals:
        best_hit = max(rivals, key=lambda r: r["hit_rate"])
        lines.append(
            f"hybrid hit {hybrid['hit_rate']:.3f} vs best peer {best_hit['hit_rate']:.3f} "
            f"({best_hit['policy']}) (target >=)"
        )
        for q in ("p50", "p99"):
            key = f"ttft_{q}_ms"
            best = min(rivals, key=lambda r: r[key])
            ratio = hybrid[key] / best[key] if best[key] else 0.0
            lines.append(
                f"hybrid TTFT {q} {hybrid[key]:.0f} ms = {ratio:.2f} x best peer's "
                f"{best[key]:.0f} ms ({best['policy']}) (target <= 0.70)"
            )
            floor = hybrid.get(f"ttft_floor_{q}_ms")
            if floor:
                lines.append(
                    f"  TTFT {q} floor (each request alone on an idle worker holding every block "
                    f"ever computed) {floor:.0f} ms: hybrid {hybrid[key] / floor:.2f} x, "
                    f"{best['policy']} {best[key] / floor:.2f} x, the target "
                    f"{0.7 * best[key] / floor:.2f} x"
                )
    elif rr := by.get("round_robin"):
        for q in ("p50", "p99"):
            ratio = hybrid[f"ttft_{q}_ms"] / rr[f"ttft_{q}_ms"] if rr[f"ttft_{q}_ms"] else 0.0
            lines.append(f"hybrid TTFT {q} = {ratio:.2f} x round_robin's (no peer in this run)")
    return lines
