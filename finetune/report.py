"""Collect every fine-tuning run's metrics.json under a folder into one table and plots.

The table has the literature's shape (backbone, method, epochs, prototypes, AP, AP50,
APs, APm, APl); runs that share a setting (seeds, folds) are also summarised as
mean ± std.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from finetune.coco_results import format_table
from finetune.report_html import index_html, write_reports

SETTING = ("backbone", "method", "epochs", "prototypes", "detector", "semi", "threshold", "unsup_weight", "labeled")
METRICS = ("AP", "AP50", "APs", "APm", "APl")
PSEUDO = ("pseudo_P", "pseudo_R")  # semi runs: pseudo-label precision / recall against hidden ground truth
COLUMNS = (*SETTING, *METRICS, *PSEUDO)
PERCENT = (*METRICS, *PSEUDO, "labeled")
RUNS_PAGE = "runs.html"  # the table as a page linking every run's report.html


def load_rows(root: str | Path) -> list[dict[str, Any]]:
    """One row per fine-tuning run found below ``root`` (its metrics.json)."""
    rows = []
    for path in sorted(Path(root).rglob("metrics.json")):
        try:
            m = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"[report] skipped unreadable {path}: {e}")
            continue
        if m.get("stage") != "finetune":
            continue
        rows.append(row_of(m, path.parent, Path(root)))
    return rows


def row_of(m: dict[str, Any], run_dir: Path, root: Path) -> dict[str, Any]:
    bb = m.get("backbone") or {}
    pretrained = bool(bb.get("checkpoint"))
    coco = m.get("coco") or {}
    row: dict[str, Any] = {
        "backbone": bb.get("arch", "?"),
        "method": (bb.get("method") or "pretrained") if pretrained else "random init",
        "epochs": bb.get("epochs") if pretrained else None,
        "prototypes": bb.get("num_prototypes") if pretrained else None,
        "detector": m.get("detector", "?"),
        "run": str(run_dir.relative_to(root)) if run_dir != root else ".",
    }
    semi = m.get("semi") or {}
    settings = semi.get("settings") or {}
    health = semi.get("pseudo_labels") or {}
    threshold = settings.get("threshold")
    row.update({
        "semi": semi.get("mode") or "none",
        "threshold": (threshold if isinstance(threshold, str) else float(threshold)) if threshold is not None else None,
        "unsup_weight": float(settings["unsup_weight"]) if settings.get("unsup_weight") is not None else None,
        "labeled": float(m["labeled_fraction"]) if m.get("labeled_fraction") is not None else None,
        "pseudo_P": health.get("precision"),
        "pseudo_R": health.get("recall"),
    })
    if not semi:
        row["threshold"] = row["unsup_weight"] = None
    for k in METRICS:
        v = coco.get(k)
        row[k] = None if v is None or v < 0 else float(v)
    return row


def _fmt(v: Any, scale: float = 100.0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v * scale:.1f}" if scale != 1 else f"{v:g}"
    return str(v)


def _cell(r: dict[str, Any], c: str) -> str:
    """Metrics, pseudo-label figures and the labeled fraction in %; settings as given."""
    return _fmt(r[c], 100.0 if c in PERCENT else 1.0)


def summarise(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std of the metrics over runs with the same setting."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in SETTING)].append(r)
    out = []
    for key, rs in groups.items():
        s: dict[str, Any] = dict(zip(SETTING, key))
        s["n"] = len(rs)
        for k in METRICS:
            vals = [r[k] for r in rs if r[k] is not None]
            s[k] = statistics.fmean(vals) if vals else None
            s[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(s)
    return sorted(out, key=_sort_key)


def _sort_key(r: dict[str, Any]) -> tuple:
    values = (r[k] for k in SETTING)
    return tuple((v is None, str(v) if not isinstance(v, (int, float)) else f"{v:012.4f}") for v in values)


def markdown(rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join((*COLUMNS, "run")) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for r in sorted(rows, key=_sort_key):
        lines.append("| " + " | ".join(_cell(r, c) for c in (*COLUMNS, "run")) + " |")
    if any(s["n"] > 1 for s in summary):
        lines += ["", "Mean ± std over runs with the same setting (AP in %):", ""]
        lines.append("| " + " | ".join((*SETTING, "n", *METRICS)) + " |")
        lines.append("|" + "---|" * (len(SETTING) + 1 + len(METRICS)))
        for s in summary:
            cells = [_cell(s, k) for k in SETTING] + [str(s["n"])]
            cells += [f"{_fmt(s[k])} ± {_fmt(s[k + '_std'])}" if s[k] is not None else "-" for k in METRICS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict[str, Any]], x: str, path: Path) -> Path | None:
    """AP against ``x`` (epochs, prototypes or the labeled fraction), one line per other setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [k for k in SETTING if k not in (x,)]
    lines: dict[tuple, list[tuple[float, float, float]]] = defaultdict(list)
    for s in summary:
        if s[x] is None or s["AP"] is None:
            continue
        scale = 100.0 if x == "labeled" else 1.0  # the labeled fraction in %
        lines[tuple(s[k] for k in others)].append((float(s[x]) * scale, s["AP"] * 100, s["AP_std"] * 100))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, pts in sorted(lines.items(), key=lambda kv: str(kv[0])):
        pts.sort()
        xs, ys, es = zip(*pts)
        label = ", ".join(f"{k}={v}" for k, v in zip(others, key) if v is not None)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
    for s in summary:
        if s["method"] == "random init" and s["AP"] is not None:
            ax.axhline(s["AP"] * 100, ls="--", color="gray", label=f"random init ({s['detector']})")
    ax.set_xlabel("labeled images (%)" if x == "labeled" else x)
    ax.set_ylabel("AP (%)")
    ax.set_title(f"COCO AP against {x}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(root: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """Write report.md, report.csv, the AP plots and runs.html (the table, linking every run's report.html,
    which is rewritten) for every run under ``root``."""
    root = Path(root)
    out_dir = Path(out) if out else root
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = load_rows(root)
    if not rows:
        raise FileNotFoundError(f"no fine-tuning metrics.json under {root}")
    summary = summarise(rows)
    files = {"md": out_dir / "report.md", "csv": out_dir / "report.csv"}
    files["md"].write_text(markdown(rows, summary))
    with files["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*COLUMNS, "run"])
        w.writeheader()
        for r in sorted(rows, key=_sort_key):
            w.writerow({k: ("" if r[k] is None else r[k]) for k in (*COLUMNS, "run")})
    for x in ("epochs", "prototypes", "labeled"):
        p = plot(summary, x, out_dir / f"ap_vs_{x}.png")
        if p is not None:
            files[x] = p
    # Each run's report.html (re)written, and a page with the table linking them all.
    reports = write_reports(root)
    files["html"] = out_dir / RUNS_PAGE
    files["html"].write_text(index_html(rows, reports, root, files["md"].read_text(), out_dir), encoding="utf-8")
    return files




def compare(runs: dict[str, dict[str, Any]], keys: Iterable[str] = ("AP", "AP50", "AP75", "APs", "APm", "APl")) -> str:
    """A side-by-side table (AP in %) of the COCO summaries of named runs, first minus last."""
    return format_table({n: (r.get("coco") or {}) for n, r in runs.items()}, keys=list(keys), difference=True)
