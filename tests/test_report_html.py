"""report.html: written at the end of every fine-tuning run and by ``make report``, self-contained, showing
the run's numbers; in a real headless browser (slow) it renders with every picture decoded and no
console message."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import finetune_smoke_cfg
from PIL import Image

from finetune.report import write_report
from finetune.report_html import REPORT, render, semi_health
from finetune.run import run
from finetune.train import train


@pytest.fixture(scope="module")
def finetune_run(synthetic_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "frcnn"
    train(finetune_smoke_cfg(synthetic_data["root"]), run_dir=run_dir)
    return run_dir


def pictures(page: str) -> list[Image.Image]:
    """Every picture of a page, decoded; fails on any picture that is not an embedded PNG."""
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert all(s.startswith("data:image/png;base64,") for s in srcs), "a picture is not embedded"
    out = []
    for s in srcs:
        img = Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1])))
        img.load()
        out.append(img)
    return out


def test_every_run_ends_with_a_self_contained_report(finetune_run):
    page = (finetune_run / REPORT).read_text()
    m = json.loads((finetune_run / "metrics.json").read_text())
    # Nothing fetched from elsewhere: no external scripts, styles, fonts or pictures.
    assert not re.search(r'(src|href)="(https?:|//|file:)', page) and "@import" not in page
    # The COCO table and per-class AP say what metrics.json says.
    assert f"<td>{100 * m['coco']['AP50']:.1f}</td>" in page
    for name, ap in m["per_class_ap"].items():
        assert f"<td>{name}</td><td>{100 * ap:.1f}</td>" in page
    assert f"{m['num_train_images']}" in page and "fasterrcnn" in page
    # Loss, LR and AP curves and the predictions grid, as decodable pictures of a sensible size.
    imgs = pictures(page)
    assert len(imgs) == 4 and all(im.width > 200 and im.height > 150 for im in imgs)
    assert "Pseudo-labels" not in page  # a plain fine-tuning run has no teacher
    # The confusion matrix: a header per predicted class and "missed", a row per class and "background",
    # each class's row holding its counts (empty cells for zero).
    confusion = m["confusion"]
    assert "".join(f"<th>{c}</th>" for c in confusion["columns"]) in page
    for name, row in zip(confusion["rows"], confusion["matrix"]):
        cells = re.search(rf"<tr><th>{re.escape(name)}</th>(.*?)</tr>", page).group(1)
        assert re.findall(r"<td[^>]*>(\d*)</td>", cells) == [str(n) if n else "" for n in row]


def test_make_report_writes_every_runs_report_and_a_page_linking_them(finetune_run, tmp_path):
    root = finetune_run.parent
    (finetune_run / REPORT).unlink()
    files = write_report(root, tmp_path / "out")
    assert (finetune_run / REPORT).is_file()  # rewritten from the run's files
    index = files["html"].read_text()
    link = re.search(r'<a href="([^"]+)">', index)
    assert link and (files["html"].parent / link.group(1)).resolve() == (finetune_run / REPORT).resolve()
    assert "<th>AP</th>" in index and "frcnn" in index


def test_a_run_without_plots_gets_its_pictures_drawn_from_its_files(finetune_run, tmp_path):
    run_dir = tmp_path / "noplots"
    shutil.copytree(finetune_run, run_dir, ignore=shutil.ignore_patterns("*.ckpt", "plots"))
    m = json.loads((run_dir / "metrics.json").read_text())
    m["ann_file"] = str(run_dir / "ground_truth.json")
    page = render(run_dir, m)
    assert len(pictures(page)) == 2  # the per-epoch curves and the predictions grid, drawn now


def test_semi_health_shows_the_pseudo_labels_epoch_by_epoch():
    def epoch(e: int, boxes: float, precision: float) -> dict:
        return {"epoch": e, "val_teacher_AP": 0.1 * e, "val_student_AP": 0.08 * e, "sup_loss": 1.0 / (e + 1),
                "unsup_loss": 0.2, "pseudo_labels": {
                    "pseudo_boxes_per_image": boxes, "labeled_boxes_per_image": 3.0, "images_without_pseudo": 0.1,
                    "precision": precision, "recall": 0.5,
                    "per_class": {"cat": {"pseudo_boxes_per_image": boxes, "threshold": 0.7, "precision": precision,
                                          "recall": 0.5}}}}

    m = {"semi": {"mode": "unbiased_teacher", "warnings": {"no_pseudo_boxes": 2}},
         "history": [{"epoch": 0, "val_AP": 0.0}, epoch(1, 1.5, 0.6), epoch(2, 2.5, 0.8)]}
    section = semi_health(m)
    assert "unbiased_teacher" in section and "no_pseudo_boxes x2" in section
    assert len(pictures(section)) == 1
    assert "<td>cat</td><td>2.5</td><td>0.7</td><td>80.0</td><td>50.0</td>" in section  # the last epoch's
    burn_in_only = semi_health({"semi": {"mode": "mean_teacher"}, "history": [{"epoch": 0}]})
    assert "No pseudo-labels were made" in burn_in_only


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    pytest.skip("no headless browser: apt-get update && apt-get install -y chromium")


def open_in_browser(page: Path, screenshot: Path) -> tuple[str, list[str]]:
    """(the DOM after load, the console messages) of ``page`` in headless Chromium, and a screenshot."""
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=5000", "--window-size=1200,2400", "--hide-scrollbars"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True)
    subprocess.run([*flags, f"--screenshot={screenshot}", page.as_uri()], capture_output=True, timeout=120,
                   check=True)
    console = [ln for ln in dom.stderr.splitlines() if ":CONSOLE" in ln]
    return dom.stdout, console


@pytest.mark.slow
def test_semi_run_report_renders_in_a_headless_browser(synthetic_data, tmp_path):
    run_dir = tmp_path / "semi"
    run(finetune_smoke_cfg(synthetic_data["root"], "semi=unbiased_teacher", "semi.burn_in=1", "semi.threshold=0.0",
                           "semi.ema_decay=0.5"), run_dir)
    page = run_dir / REPORT
    html_text = page.read_text()
    assert "Pseudo-labels over time" in html_text and "precision %" in html_text
    dom, console = open_in_browser(page, tmp_path / "shot.png")
    assert console == []  # no error, no warning, no log line of any kind
    assert f'data-pictures="{len(pictures(html_text))}"' in dom  # every picture decoded in the browser
    shot = Image.open(tmp_path / "shot.png").convert("L")
    assert shot.size == (1200, 2400)
    hist = shot.histogram()
    assert max(hist) < 0.95 * sum(hist)  # not a blank page
    # The harness sees a broken picture: the same page with one picture damaged logs an error.
    broken = tmp_path / "broken.html"
    broken.write_text(html_text.replace("base64,", "base64,AAAA", 1))
    _, console = open_in_browser(broken, tmp_path / "broken.png")
    assert any("did not decode" in ln for ln in console)
