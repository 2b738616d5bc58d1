"""A run's report as one self-contained HTML file (``report.html`` beside metrics.json).

Everything is inside the file (pictures as data URIs, no scripts or styles from elsewhere), so it can
be mailed or attached as it is. It shows what metrics.json and the run's plots hold: the COCO table,
per-class AP, the loss / LR / val-AP curves, for teacher-student runs the pseudo-label health epoch by
epoch, and predictions drawn against the ground truth. Written at the end of every fine-tuning run
(:func:`finetune.finish.finish`) and for every run under a folder by ``make report``
(:func:`write_reports`). A small script checks, in the reader's browser, that every picture decoded,
and says so on the console otherwise.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from finetune.coco_eval import COCO_STATS

log = logging.getLogger(__name__)
REPORT = "report.html"
CURVES = ("loss.png", "lr.png", "val_ap.png")

_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1100px;color:#222;
  padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0} td,th{padding:.25em .7em;border-bottom:1px solid #eee;text-align:right}
th{background:#f5f5f5} td:first-child,th:first-child{text-align:left}
.facts td{text-align:left} .muted{color:#777;font-size:.9em}
.bar{display:inline-block;height:.8em;background:#4a7bd0;vertical-align:middle}
.pics img{max-width:100%;border:1px solid #eee;margin:.3em 0}
.warn{color:#a40} .pics{display:flex;flex-wrap:wrap;gap:1em} .pics figure{margin:0;flex:1 1 320px}
figcaption{font-size:.85em;color:#555}
"""

# Every picture must have decoded: a broken one is a console error (which the browser test reads).
_SCRIPT = """
window.addEventListener('load', function () {
  var bad = Array.prototype.filter.call(document.images, function (im) {
    return !im.complete || im.naturalWidth === 0;
  });
  bad.forEach(function (im) { console.error('report picture did not decode: ' + im.alt); });
  document.body.setAttribute('data-pictures', String(document.images.length - bad.length));
});
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _pct(v: Any) -> str:
    """AP-like numbers in %, '-' where COCO says there is nothing to measure (-1) or none."""
    if v is None or (isinstance(v, (int, float)) and v < 0):
        return "-"
    return f"{100 * float(v):.1f}"


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return _e(v)


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="{png_data_uri(data)}">'


def _figure(data: bytes, caption: str) -> str:
    return f"<figure>{_img(data, caption)}<figcaption>{_e(caption)}</figcaption></figure>"


# ------------------------------------------------------------------------------------ sections
def facts(m: Mapping[str, Any], run_dir: Path) -> str:
    bb = m.get("backbone") or {}
    semi = m.get("semi") or {}
    backbone = (f"{bb.get('arch', '?')} {bb.get('method') or ''} "
                f"{'from ' + str(bb['checkpoint']) if bb.get('checkpoint') else '(random init)'}")
    rows = [
        ("run", str(run_dir)),
        ("stage", m.get("stage")),
        ("detector", m.get("detector")),
        ("backbone", backbone.strip()),
        ("semi-supervised", f"{semi['mode']} (deployed: {semi.get('deployed')})" if semi else None),
        ("classes", m.get("num_classes")),
        ("training images", m.get("num_train_images")),
        ("labeled fraction", f"{100 * m['labeled_fraction']:.1f}% (split seed {m.get('split_seed')})"
         if m.get("labeled_fraction") is not None else None),
        ("best epoch", m.get("best_epoch")),
        ("steps", m.get("global_step")),
        ("training time", f"{m['train_time_s']:.0f} s" if m.get("train_time_s") is not None else None),
        ("precision", m.get("precision")),
        ("evaluated on", f"{m.get('num_images')} images of {m.get('source_ann_file') or m.get('ann_file')}"
         if m.get("num_images") is not None else None),
        ("skipped images", len(m["skipped_images"]) if m.get("skipped_images") else None),
    ]
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows if v is not None)
    return f'<table class="facts">{body}</table>'


def coco_table(coco: Mapping[str, Any] | None) -> str:
    if not coco:
        return '<p class="muted">No validation set: no COCO evaluation (data.val_json).</p>'
    keys = [k for k in COCO_STATS if k in coco]
    head = "".join(f"<th>{_e(k)}</th>" for k in keys)
    cells = "".join(f"<td>{_pct(coco[k])}</td>" for k in keys)
    return (f"<table><tr><th></th>{head}</tr><tr><td>%</td>{cells}</tr></table>"
            '<p class="muted">COCO protocol (pycocotools); AP = AP@[.5:.95], "-" where the set has no '
            "object of that size.</p>")


def per_class_table(per_class: Mapping[str, Any] | None) -> str:
    if not per_class:
        return ""
    rows = []
    for name, ap in sorted(per_class.items(), key=lambda kv: -(kv[1] if kv[1] is not None else -1)):
        width = 0 if ap is None or ap < 0 else round(300 * float(ap))
        rows.append(f'<tr><td>{_e(name)}</td><td>{_pct(ap)}</td><td style="text-align:left">'
                    f'<span class="bar" style="width:{width}px"></span></td></tr>')
    return f"<table><tr><th>class</th><th>AP %</th><th></th></tr>{''.join(rows)}</table>"


def confusion_table(confusion: Mapping[str, Any] | None) -> str:
    """The confusion matrix (:mod:`finetune.confusion`): counts, each cell shaded by its share of its row
    (a true class's objects; the background row by its largest cell)."""
    if not confusion:
        return ""
    rows, columns, matrix = confusion["rows"], confusion["columns"], confusion["matrix"]
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = []
    for r, name in enumerate(rows):
        total = sum(matrix[r]) if r < len(rows) - 1 else max(max(matrix[r]), 1)
        cells = []
        for c, n in enumerate(matrix[r]):
            share = n / total if total else 0.0
            colour = "74,123,208" if r == c else "208,96,74"
            style = f' style="background:rgba({colour},{0.75 * share:.2f})"' if n else ""
            cells.append(f"<td{style}>{n if n else ''}</td>")
        body.append(f"<tr><th>{_e(name)}</th>{''.join(cells)}</tr>")
    return (f"<table><tr><th>true \\ predicted</th>{head}</tr>{''.join(body)}</table>"
            f'<p class="muted">Best checkpoint on the validation set: detections with score &ge; '
            f"{_e(confusion['score'])}, matched class-agnostically at IoU &ge; {_e(confusion['iou'])} (highest "
            "score first); off-diagonal cells are objects boxed under another class, <i>missed</i> objects no "
            "detection matched, <i>background</i> unmatched detections (on no object, or on one a "
            "higher-scoring detection took), shaded against the row's largest cell.</p>")


Series = Mapping[str, tuple[Sequence[float], Sequence[float | None]]]


def _charts(panels: Sequence[tuple[str, str, Series, Mapping[str, float] | None]]) -> bytes | None:
    """Line charts side by side in one matplotlib figure, as PNG bytes: per panel (title, y label,
    named series, named reference lines); panels without a point are left out, None if all are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = []
    for title, ylabel, series, refs in panels:
        drawn = {k: [(x, y) for x, y in zip(*v) if y is not None] for k, v in series.items()}
        drawn = {k: v for k, v in drawn.items() if v}
        if drawn:
            kept.append((title, ylabel, drawn, refs))
    if not kept:
        return None
    fig, axes = plt.subplots(1, len(kept), figsize=(4.2 * len(kept), 3), squeeze=False)
    for ax, (title, ylabel, drawn, refs) in zip(axes[0], kept):
        for name, pts in drawn.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
        for name, y in (refs or {}).items():
            ax.axhline(y, ls="--", color="gray", lw=1, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def curves(run_dir: Path, history: Sequence[Mapping[str, Any]]) -> str:
    """The run's own curve plots, or (plots off) the per-epoch history drawn here."""
    pics = [_figure((run_dir / "plots" / n).read_bytes(), n[:-4].replace("_", " "))
            for n in CURVES if (run_dir / "plots" / n).is_file()]
    if not pics and history:
        epochs = [h.get("epoch", i) for i, h in enumerate(history)]
        panels = [(label, label, {label: (epochs, [h.get(key) for h in history])}, None)
                  for key, label in (("train_loss", "training loss"), ("lr", "learning rate"), ("val_AP", "val AP"))]
        png = _charts(panels)
        if png is not None:
            pics.append(_figure(png, "per epoch: training loss, learning rate, val AP"))
    return f'<div class="pics">{"".join(pics)}</div>' if pics else '<p class="muted">No curves recorded.</p>'


def semi_health(m: Mapping[str, Any]) -> str:
    """Teacher-student runs: pseudo-label health and teacher / student AP epoch by epoch."""
    semi = m.get("semi")
    if not semi:
        return ""
    history = [h for h in m.get("history") or [] if h.get("pseudo_labels")]
    parts = [f"<h2>Pseudo-labels over time ({_e(semi.get('mode'))})</h2>"]
    if not history:
        parts.append('<p class="warn">No pseudo-labels were made (the teacher never started: burn-in longer '
                     "than the run?).</p>")
        return "".join(parts)
    epochs = [h.get("epoch", i) for i, h in enumerate(history)]
    pl = [h["pseudo_labels"] for h in history]
    labeled = pl[-1].get("labeled_boxes_per_image")
    png = _charts([
        ("pseudo-labels per image", "per image",
         {"pseudo-boxes / unlabeled image": (epochs, [p.get("pseudo_boxes_per_image") for p in pl]),
          "images without pseudo-boxes": (epochs, [p.get("images_without_pseudo") for p in pl])},
         {"boxes / labeled image": labeled} if labeled else None),
        ("against the hidden ground truth", "fraction",
         {"precision": (epochs, [p.get("precision") for p in pl]), "recall": (epochs, [p.get("recall") for p in pl])},
         None),
        ("val AP", "AP", {"teacher": (epochs, [h.get("val_teacher_AP") for h in history]),
                          "student": (epochs, [h.get("val_student_AP") for h in history])}, None),
        ("semi-phase losses", "loss", {"supervised": (epochs, [h.get("sup_loss") for h in history]),
                                       "unsupervised": (epochs, [h.get("unsup_loss") for h in history])}, None),
    ])
    if png is not None:
        parts.append(f'<div class="pics">{_figure(png, "pseudo-label health, teacher and student, by epoch")}</div>')
    if all(p.get("precision") is None for p in pl):
        parts.append('<p class="muted">No precision / recall: the unlabeled images carry no hidden ground truth '
                     "(the split protocol's unlabeled.json has it).</p>")
    last = pl[-1].get("per_class") or {}
    if last:
        rows = "".join(f"<tr><td>{_e(n)}</td><td>{_num(c.get('pseudo_boxes_per_image'))}</td>"
                       f"<td>{_num(c.get('threshold'))}</td><td>{_pct(c.get('precision'))}</td>"
                       f"<td>{_pct(c.get('recall'))}</td></tr>" for n, c in last.items())
        parts.append(f"<p>Last epoch ({epochs[-1]}), per class:</p><table><tr><th>class</th>"
                     "<th>pseudo-boxes / image</th><th>score threshold</th><th>precision %</th><th>recall %</th>"
                     f"</tr>{rows}</table>")
    warnings = semi.get("warnings") or {}
    raised = {k: v for k, v in warnings.items() if v}
    if raised:
        parts.append('<p class="warn">Warnings raised: ' + ", ".join(f"{_e(k)} x{v}" for k, v in raised.items())
                     + "</p>")
    return "".join(parts)


def predictions(run_dir: Path, m: Mapping[str, Any], num_images: int = 6, score: float = 0.5) -> str:
    """The run's predictions-against-ground-truth grid (drawn now from its files if plots were off)."""
    png = run_dir / "plots" / "predictions.png"
    if not png.is_file():
        ann, preds = m.get("ann_file"), run_dir / "predictions.json"
        if not (ann and Path(ann).is_file() and preds.is_file()):
            return '<p class="muted">No predictions on a validation set.</p>'
        from finetune.plots import plot_predictions

        png = run_dir / "plots" / "predictions.png"
        if plot_predictions(ann, {"predictions": preds}, png, image_root=m.get("image_root"),
                            num_images=num_images, score=score) is None:
            return '<p class="muted">No validation image has boxes.</p>'
    return (f'<div class="pics">{_figure(png.read_bytes(), "ground truth (green) and predictions (red)")}</div>')


def render(run_dir: str | Path, metrics: Mapping[str, Any] | None = None) -> str:
    """The HTML of one run's report (``metrics``: its metrics.json, read if not given)."""
    run_dir = Path(run_dir)
    m = dict(metrics) if metrics is not None else json.loads((run_dir / "metrics.json").read_text())
    history = m.get("history") or []
    title = f"{m.get('detector', 'detector')} run {run_dir.name}"
    ap = (m.get("coco") or {}).get("AP")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>",
        f"<h1>{_e(title)}</h1>",
        (f'<p class="muted">AP {_pct(ap)}% &middot; written {_dt.datetime.now().strftime("%Y-%m-%d %H:%M")} '
         "by fewlabel-det</p>"),
        facts(m, run_dir),
        "<h2>COCO evaluation of the best checkpoint</h2>", coco_table(m.get("coco")),
        "<h2>AP per class</h2>", per_class_table(m.get("per_class_ap")) or '<p class="muted">-</p>',
        *(["<h2>What each class was taken for</h2>", confusion_table(m["confusion"])] if m.get("confusion") else []),
        "<h2>Training curves</h2>", curves(run_dir, history),
        semi_health(m),
        "<h2>Predictions against ground truth</h2>", predictions(run_dir, m),
        "</body></html>",
    ])


def write_run_report(run_dir: str | Path, metrics: Mapping[str, Any] | None = None) -> Path:
    """Write ``<run_dir>/report.html``; returns its path."""
    out = Path(run_dir) / REPORT
    out.write_text(render(run_dir, metrics), encoding="utf-8")
    return out


def write_reports(root: str | Path) -> list[Path]:
    """``report.html`` for every fine-tuning run (a metrics.json of stage finetune) under ``root``; a run
    whose report cannot be written is named on the log and skipped."""
    written = []
    for path in sorted(Path(root).rglob("metrics.json")):
        try:
            m = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("skipped unreadable %s: %s", path, e)
            continue
        if m.get("stage") != "finetune":
            continue
        try:
            written.append(write_run_report(path.parent, m))
        except Exception as e:  # noqa: BLE001 (one broken run must not stop the others' reports)
            log.warning("report of %s failed: %s", path.parent, e)
    return written


def index_html(rows: Sequence[Mapping[str, Any]], reports: Sequence[Path], root: Path, table_md: str,
               page_dir: Path) -> str:
    """The collection's page (written into ``page_dir``): the table of every run, each run linked to its
    report.html."""
    links = "".join(f'<li><a href="{_e(Path(os.path.relpath(p, page_dir)).as_posix())}">'
                    f"{_e(p.parent.relative_to(root))}</a></li>" for p in reports)
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>runs under {_e(root.name)}</title><style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>",
        f"<h1>{len(rows)} fine-tuning runs under {_e(root)}</h1>",
        _markdown_table_html(table_md),
        f"<h2>Reports</h2><ul>{links}</ul>",
        "</body></html>",
    ])


def _markdown_table_html(md: str) -> str:
    """The first markdown table of ``md`` as HTML (report.md's table, so the two never disagree)."""
    lines: list[str] = []
    for ln in md.splitlines():
        if ln.startswith("|"):
            lines.append(ln)
        elif lines:
            break
    if len(lines) < 2:
        return ""
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines if not set(ln) <= set("|-: ")]
    head, *body = cells
    out = "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in head) + "</tr>"
    out += "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table>{out}</table>"
