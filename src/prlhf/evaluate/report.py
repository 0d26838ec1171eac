"""Per-user accuracy as a Markdown table and a PNG bar chart, for one or several methods side by side."""

from __future__ import annotations

import io
import os
from pathlib import Path

from prlhf.safe_io import atomic_write_bytes

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    """Whether `path` starts like a PNG file: what `eval --plot` may replace without --overwrite."""
    try:
        with open(path, "rb") as f:
            return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError:
        return False


def save_figure(fig, path: str | os.PathLike, dpi: int) -> Path:
    """Write the figure as PNG through a temporary file: a reader never sees half a plot."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def accuracy_table(results: dict[str, dict], users: dict[str, dict] | None = None) -> str:
    """results: method -> eval JSON. users: optional user_id -> info (e.g. group) shown as extra columns."""
    methods = list(results)
    all_users = sorted({u for r in results.values() for u in r["per_user"]})
    extra = sorted({k for info in (users or {}).values() for k in info if k != "seen"})
    head = ["user", *extra, "seen", "n", *methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for u in all_users:
        first = next(r["per_user"][u] for r in results.values() if u in r["per_user"])
        info = (users or {}).get(u, {})
        cells = [u, *(str(info.get(k, "")) for k in extra), "yes" if first["seen"] else "no", str(first["n"])]
        cells += [_fmt(r["per_user"].get(u, {}).get("accuracy")) for r in results.values()]
        lines.append("| " + " | ".join(cells) + " |")
    for key, label in (("mean_user_accuracy", "mean (seen users)"), ("worst_user_accuracy", "worst seen user"),
                       ("unseen_accuracy", "unseen users (pooled)"), ("accuracy", "all pairs (pooled)")):
        cells = [f"**{label}**", *([""] * len(extra)), "", ""] + [_fmt(r.get(key)) for r in results.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def accuracy_plot(results: dict[str, dict], path: str | os.PathLike, users: dict[str, dict] | None = None,
                  group_key: str | None = None, title: str = "Per-user held-out accuracy") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    all_users = sorted({u for r in results.values() for u in r["per_user"]})
    labels = [f"{u}\n({users[u][group_key]})" if users and group_key and u in users else u for u in all_users]
    width = 0.8 / max(1, len(results))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(all_users) * max(1, len(results)) / 1.5), 4.0))
    for i, (method, r) in enumerate(results.items()):
        ys = [r["per_user"].get(u, {}).get("accuracy", 0.0) for u in all_users]
        ax.bar([x + (i - (len(results) - 1) / 2) * width for x in range(len(all_users))], ys, width, label=method)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(all_users)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (implicit reward)")
    ax.set_title(title, pad=24)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.08), ncol=len(results), frameon=False)
    fig.tight_layout()
    path = save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
