"""`reparam convert --plot FILE.png`: the verification at a glance (needs the plot extra: matplotlib).

One bar per converted block: its relative error (max abs error / max |float64 reference output|),
on a log scale, against the tolerance (rtol) and the float rounding floor (the training model's
own error in its dtype). A failing block is drawn red. The title line says whether the whole model
passed; the subtitle gives parameters and FLOPs before -> after.
"""

from __future__ import annotations

from pathlib import Path

from reparam_cli.io.safeio import atomic_output


def _count(n: int | None, scale: float, unit: str) -> str:
    return "-" if n is None else f"{n / scale:.3g} {unit}"


def write_plot(report: dict, path: str | Path) -> Path:
    """Draw `report` (what convert returns, or VerificationFailed.report: needs `block_errors`) as a
    PNG at `path`, written atomically. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt


    blocks = report.get("block_errors") or []
    floor, rtol = report.get("train_rel_err"), report.get("rtol")
    tiny = 1e-18  # an exact block (error 0) still gets a visible stub on the log scale
    values = [max(b["max_rel_err"], tiny) for b in blocks]
    colors = ["#2a7ab0" if b["ok"] else "#d62728" for b in blocks]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(blocks) + 2.5), 4.2), dpi=100)
    ax.bar(range(len(blocks)), values, color=colors)
    ax.set_yscale("log")
    top = max([*values, rtol or tiny, floor or tiny])
    ax.set_ylim(top=top * 100)  # room for the legend above the tolerance line
    if rtol:
        ax.axhline(rtol, color="#d62728", linestyle="--", linewidth=1.2, label=f"tolerance rtol {rtol:.0e}")
    if floor is not None and floor > 0:
        ax.axhline(floor, color="#555555", linestyle=":", linewidth=1.2,
                   label=f"float floor {floor:.1e} (training model in its dtype)")
    end = report.get("max_rel_err")
    if end is not None:
        ax.axhline(max(end, tiny), color="#2ca02c", linewidth=1.0, label=f"whole model {end:.1e}")
    ax.set_xticks(range(len(blocks)))
    ax.set_xticklabels([b["path"] or "<root>" for b in blocks], rotation=90, fontsize=7)
    ax.set_ylabel("relative error of the block's output")
    failed = [b["path"] for b in blocks if not b["ok"]]
    verdict = "OK" if report.get("ok", True) else f"FAILED ({len(failed)} block{'s' * (len(failed) != 1)} over)"
    ax.set_title(f"{report.get('spec', '')}: {verdict}\n"
                 f"params {_count(report.get('params_before'), 1e6, 'M')} -> "
                 f"{_count(report.get('params_after'), 1e6, 'M')}, "
                 f"FLOPs {_count(report.get('flops_before'), 1e9, 'G')} -> "
                 f"{_count(report.get('flops_after'), 1e9, 'G')}", fontsize=10,
                 color="black" if report.get("ok", True) else "#d62728")
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
