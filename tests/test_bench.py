"""The benchmarks' honesty rules: the ceiling is the best configuration this machine has, ratios are
against it and the plain loop, and the report names the machine and keeps other machines' figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_pretrain
import bench_report


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "pretrain.json"
    bench_pretrain.main(["--batch-size", "4", "--crops", "32x2,16x2", "--prototypes", "16", "--steps", "1",
                         "--warmup", "1", "--rounds", "1", "--threads", "1", "--json", str(out)])
    return json.loads(out.read_text())


@pytest.mark.slow  # a real bench run (bf16 emulated on CPUs without it)
def test_ceiling_is_the_best_of_every_precision_and_format(tiny_bench: dict) -> None:
    rows = tiny_bench["rows"]
    configs = {m: r["images_per_s"] for m, r in rows.items() if m.startswith("ceiling_")}
    assert set(configs) == {"ceiling_32_nchw", "ceiling_32_nhwc", "ceiling_bf16-mixed_nchw", "ceiling_bf16-mixed_nhwc"}
    assert rows["ceiling"]["images_per_s"] == max(configs.values())
    ours = rows["ours"]
    assert ours["vs_ceiling"] == pytest.approx(ours["images_per_s"] / rows["ceiling"]["images_per_s"], rel=1e-2)
    assert ours["vs_plain"] == pytest.approx(ours["images_per_s"] / rows["plain"]["images_per_s"], rel=1e-2)
    assert ours["precision"] == tiny_bench["machine"]["auto"]["precision"]


@pytest.mark.slow  # shares that bench run
def test_report_names_the_machine_and_keeps_other_sections(tiny_bench: dict, tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    other = tiny_bench | {"machine": {**tiny_bench["machine"], "cpu": "Other CPU"}}
    for d in (other, tiny_bench, tiny_bench):  # the second write of a machine replaces its section
        text, key = bench_report.section([d])
        bench_report.update(md, text, key)
    body = md.read_text()
    assert body.count("### Other CPU") == 1 and body.count(f"### {tiny_bench['machine']['cpu']},") == 1
    assert tiny_bench["command"] in body and tiny_bench["machine"]["auto"]["reason"] in body
    assert f"| ours | {tiny_bench['rows']['ours']['images_per_s']:.2f} |" in body


def test_step_and_inference_tables_carry_the_ratios_and_where_time_goes() -> None:
    machine = {"cpu": "Some CPU", "cpu_flags": [], "cores": 2, "torch_threads": 2, "torch": "2",
               "auto": {"precision": "32", "channels_last": True, "reason": "r"}}
    steps = {"bench": "steps", "date": "d", "command": "scripts/bench_steps.py", "machine": machine, "rows": {
        "plain": {"s_per_step": 2.0, "labeled_images_per_s": 2.0, "step_vs_plain": 1.0, "peak_rss_mb": 1500,
                  "precision": "32"},
        "finetune": {"s_per_step": 1.5, "labeled_images_per_s": 2.67, "step_vs_plain": 0.75, "peak_rss_mb": 1400,
                     "precision": "32"},
        "semi": {"s_per_step": 4.2, "labeled_images_per_s": 0.95, "step_vs_plain": 2.1, "step_vs_finetune": 2.8,
                 "peak_rss_mb": 2100, "precision": "32"}}}
    infer = {"bench": "infer", "date": "d", "command": "scripts/bench_infer.py", "machine": machine, "rows": {
        "plain": {"images_per_s": 1.0, "vs_plain": 1.0, "rpn_post_nms_top_n_test": 1000, "precision": "32",
                  "peak_rss_mb": 900, "AP": 0.3, "AP50": 0.5, "time_shares": {"backbone": 0.4, "box_head": 0.3}},
        "ours_p100": {"images_per_s": 3.0, "vs_plain": 3.0, "rpn_post_nms_top_n_test": 100, "precision": "32",
                      "peak_rss_mb": 800, "AP": 0.29, "AP50": 0.49, "time_shares": {"backbone": 0.7}}}}
    text, _ = bench_report.section([steps, infer])
    assert "| semi | 4.200 | 0.95 | 2.10x | 2100 | 32 |" in text
    assert "costs 2.80x a fine-tuning step" in text
    assert "| ours_p100 | 3.00 | 3.00x | 100 | 32 | 800 | 29.0 | 49.0 | backbone 70% |" in text
    assert "backbone 40%, box_head 30%" in text


@pytest.mark.slow  # two fresh interpreters per benchmark
def test_infer_and_step_benchmarks_run_each_mode_in_its_own_process(tmp_path: Path) -> None:
    import bench_infer
    import bench_steps

    bench_infer.main(["--images", "1", "--repeats", "1", "--min-size", "96", "--classes", "3",
                      "--modes", "plain", "ours_fp32_p100", "--json", str(tmp_path / "i.json")])
    rows = json.loads((tmp_path / "i.json").read_text())["rows"]
    assert rows["plain"]["rpn_post_nms_top_n_test"] == 1000 and rows["ours_fp32_p100"]["rpn_post_nms_top_n_test"] == 100
    for r in rows.values():  # the hooked parts account for the forward pass: little is left outside them
        shares = r["time_shares"]
        assert shares["backbone"] > 0 and shares["box_head"] > 0 and -0.05 < shares["other"] < 0.3, shares
    bench_steps.main(["--steps", "1", "--warmup", "1", "--min-size", "96", "--batch-size", "1",
                      "--modes", "finetune", "semi", "--json", str(tmp_path / "s.json")])
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert rows["semi"]["steps_timed"] == 1 and rows["semi"]["step_vs_finetune"] > 0


def test_a_ledger_line_says_what_the_run_used_not_what_auto_would_pick() -> None:
    """Fine-tuning trains NCHW: its ledger line must not repeat pretraining's channels_last choice."""
    from bench_common import describe, machine_info

    info = machine_info("cpu")
    run = {"device": "cpu", "precision": "32", "channels_last": False, "reason": "forced", "torch_threads": 7}
    line = describe(info, run)
    assert "precision 32, channels_last False (forced)" in line and "7 torch threads" in line
    assert f"channels_last {info['auto']['channels_last']} ({info['auto']['reason']})" in describe(info)
