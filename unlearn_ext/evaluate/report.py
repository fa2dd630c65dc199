"""What a user reads: a terminal table, report.md and PNG plots from the harness's summary."""
from __future__ import annotations

import os

COLUMNS = [  # (summary key, header, format)
    ("method", "method", "{}"), ("ratio", "ratio", "{:.0%}"), ("test_acc", "test", "{:.3f}"),
    ("retain_acc", "retain", "{:.3f}"), ("forget_acc", "forget", "{:.3f}"), ("mia_auc", "MIA", "{:.3f}"),
    ("mia_gap", "|MIA gap|", "{:.3f}"), ("d_d0", "d/d0", "{:.2f}"), ("fr", "FR", "{:.2f}"),
    ("mrr", "MRR", "{:.3f}"), ("ud", "UD", "{:.2f}"), ("seconds", "seconds", "{:.3f}"),
    ("wall_vs_retrain", "wall/rt", "{:.3f}"), ("cpu_vs_retrain", "cpu/rt", "{:.3f}"),
    ("cost_vs_retrain", "cost", "{:.3f}"),
    ("retrain_spread_test_acc", "floor test", "{:.3f}"), ("retrain_spread_mia_auc", "floor MIA", "{:.3f}"),
]


def cell(value, fmt) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and value != value:
        return "n/a"
    return fmt.format(value)


def rows_and_notes(summary: list[dict]) -> tuple[list[list[str]], list[str]]:
    """The table's rows, and the reasons of its n/a cells: a cell whose value could not be computed
    stays, marked [i], and note i says why (e.g. UD with too few forget points, a refused method)."""
    order = {"original": 0, "retrain": 1}
    ranked = sorted(summary, key=lambda s: (s["dataset"], s["model"], s["ratio"], order.get(s["method"], 2),
                                            s["method"].split("-")[0], s["method"]))
    notes: list[str] = []
    rows = []
    for s in ranked:
        row = []
        for key, _, fmt in COLUMNS:
            text, why = cell(s.get(key), fmt), s.get(key + "_note")
            if text == "n/a" and why:
                if why not in notes:
                    notes.append(why)
                text = f"n/a [{notes.index(why) + 1}]"
            row.append(text)
        rows.append(row)
    return rows, [f"[{i + 1}] {n}" for i, n in enumerate(notes)]


def rows_for(summary: list[dict]) -> list[list[str]]:
    return rows_and_notes(summary)[0]


def print_table(summary: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="right" if header != "method" else "left")
    rows, notes = rows_and_notes(summary)
    for row in rows:
        table.add_row(*row)
    console = Console(width=220)
    console.print(table)
    for note in notes:
        console.print(note, markup=False)


def markdown(summary: list[dict], title: str, notes: list[str]) -> str:
    lines = [f"# {title}", ""] + [f"- {n}" for n in notes] + [""]
    lines.append("| " + " | ".join(h for _, h, _ in COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    rows, why = rows_and_notes(summary)
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if why:
        lines += ["", "Why a cell is n/a:", ""] + [f"- {n}" for n in why]
    lines += ["", "Columns: means over seeds. test / retain / forget: accuracy; MIA: loss-threshold AUC "
              "(forget vs test); |MIA gap|: per-run |MIA - MIA of the reference retrain|, averaged; d/d0: "
              "distance to the retrained weights relative to the original's (0 perfect, 1 did nothing); FR: "
              "forgetting rate normalized by retraining (n/a where original and retrain differ on < 2 forget "
              "samples); MRR: retain accuracy / the original's; UD: SPD-GAN's unlearning degree (where |F| >= 30); "
              "seconds: wall time of the request; wall/rt and cpu/rt: its wall time and the process's CPU time "
              "(all threads) relative to that ratio's retraining; cost: sample-gradient evaluations relative to "
              "retraining; floor test / floor MIA: spread of the reference retrain and retrains "
              "from other seeds (other initial weights and batch order; a gap within it is as good as "
              "retraining). FR, MRR and the MIA efficacy are our definitions "
              "(docs/design.md §7-8). PCMU rows are compared with PCMU's own coupled retraining.", ""]
    return "\n".join(lines)


def plots(summary: list[dict], out_dir: str) -> list[str]:
    """accuracy.png (test accuracy and |MIA gap| against the forget ratio, per method, retrain as
    the reference) and cost.png (sample-gradient cost, wall time and CPU time per method, each
    relative to retraining)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({s["method"] for s in summary}, key=lambda m: ({"retrain": 0, "original": 1}.get(m, 2), m))
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = {}
    for m in methods:
        if m.endswith("-original"):
            continue  # its own training's starting point: in the table, not the plot
        rows = sorted((s for s in summary if s["method"] == m), key=lambda s: s["ratio"])
        if m == "retrain":
            style = dict(linestyle="--", color="black")
        elif m.endswith("-retrain"):  # a method's own coupled retraining: dotted, in the method's color
            style = dict(linestyle=":", color=colors.setdefault(m[:-len("-retrain")], f"C{len(colors)}"))
        else:
            style = dict(color=colors.setdefault(m, f"C{len(colors)}"))
        ratios = [100 * s["ratio"] for s in rows]
        axes[0].plot(ratios, [_nan(s["test_acc"]) for s in rows], marker="o", label=m, **style)
        axes[1].plot(ratios, [_nan(s["mia_gap"]) for s in rows], marker="o", label=m, **style)
    axes[0].set(xlabel="forget ratio (%)", ylabel="test accuracy", title="Test accuracy")
    axes[1].set(xlabel="forget ratio (%)", ylabel="|MIA AUC - retrain's|", title="Membership-inference gap")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(loc="best", fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "accuracy.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(methods)), 3.6))
    cost_methods = [m for m in methods if m != "original" and not m.endswith(("-original", "-retrain"))]
    measures = (("cost_vs_retrain", "sample-gradients"), ("wall_vs_retrain", "wall time"), ("cpu_vs_retrain", "CPU time"))
    width = 0.8 / len(measures)
    for i, (key, label) in enumerate(measures):
        means = [_mean([s[key] for s in summary if s["method"] == m]) for m in cost_methods]
        ax.bar([j + (i - 1) * width for j in range(len(cost_methods))], means, width, label=label, color=f"C{i}")
    ax.set_xticks(range(len(cost_methods)), cost_methods, rotation=30, ha="right", fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set(ylabel="relative to retraining", title="Cost of unlearning (mean over ratios; 1 = retraining)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "cost.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _nan(value):
    return float("nan") if value is None else value


def _mean(values):
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else 0.0
