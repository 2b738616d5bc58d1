"""The logger config group: TensorBoard (or any Lightning logger by ``_target_``) beside the CSV log,
with the same scalars in every stage and the run's plots as images."""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import pytest
from test_pretrain_train import smoke_cfg as pretrain_cfg
from test_semi_train import FAST, smoke_cfg

from finetune.run import run as finetune_train
from pretrain.train import train as pretrain_train


def read_events(folder: Path) -> tuple[dict[str, list[float]], set[str]]:
    """``({scalar tag: values}, {image tags})`` from the TFRecord event files under ``folder``."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[float]] = {}
    images: set[str] = set()
    files = sorted(folder.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {folder}"
    for path in files:
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + n])  # length, its crc, the record, its crc
            i += 12 + n + 4
            for v in event.summary.value:
                kind = v.WhichOneof("value")
                if kind == "image":
                    assert v.image.height > 50 and v.image.encoded_image_string[:4] == b"\x89PNG", v.tag
                    images.add(v.tag)
                elif kind == "simple_value":
                    scalars.setdefault(v.tag, []).append(v.simple_value)
    return scalars, images


def _csv_columns(path: Path) -> set[str]:
    with open(path) as f:
        return {k for row in csv.DictReader(f) for k, v in row.items() if v}


# Two loggers by _target_ (what logger=tensorboard holds, and a second CSV one): one run checks both.
TWO = ("logger.extra=[{_target_: pytorch_lightning.loggers.TensorBoardLogger, name: tensorboard, version: ''},"
       "{_target_: pytorch_lightning.loggers.CSVLogger, name: second, version: ''}]")


@pytest.mark.parametrize("overrides, expect", [
    ((TWO,), {"train/loss_step", "val/AP", "val/AP50", "lr-SGD/head"}),
    pytest.param(("semi=unbiased_teacher", *FAST, "logger=tensorboard"), {"train/sup_loss", "train/unsup_loss",
                                                    "semi/pseudo_boxes_per_image", "val/AP", "lr-SGD/head"},
                 marks=pytest.mark.slow),
], ids=["finetune", "semi"])
def test_tensorboard_gets_the_csv_scalars_and_the_plots(overrides, expect, synthetic_data, tmp_path):
    finetune_train(smoke_cfg(synthetic_data["root"], *overrides), tmp_path)
    scalars, images = read_events(tmp_path / "tensorboard")
    assert expect <= scalars.keys(), sorted(scalars)
    # The same scalars as the CSV log (Lightning's bookkeeping columns aside).
    assert _csv_columns(tmp_path / "logs" / "metrics.csv") - {"step", "epoch"} <= scalars.keys() | {"epoch"}
    assert "plots/predictions" in images and len(images) >= 2, images  # the predictions grid and curves
    if overrides == (TWO,):  # save_dir defaults to the run directory
        assert "val/AP" in _csv_columns(tmp_path / "second" / "metrics.csv")


@pytest.mark.slow
def test_pretraining_logs_to_tensorboard_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pretrain_train(pretrain_cfg("method=swav", "logger=tensorboard"))
    scalars, images = read_events(tmp_path / "tensorboard")
    assert {"train_loss", "knn_top1"} <= scalars.keys() and len(scalars["train_loss"]) >= 1, sorted(scalars)
    assert images, "the pretraining curves were not logged as images"


def test_any_lightning_logger_by_target_and_a_clear_error_otherwise(synthetic_data, tmp_path):
    # logger=tensorboard holds the first logger of TWO above, for both stages.
    for cfg in (smoke_cfg(synthetic_data["root"], "logger=tensorboard"), pretrain_cfg("logger=tensorboard")):
        (tb,) = cfg.logger.extra
        assert (tb["_target_"], tb["name"], tb["version"]) == ("pytorch_lightning.loggers.TensorBoardLogger",
                                                               "tensorboard", "")
    with pytest.raises(ValueError, match="no _target_"):
        finetune_train(smoke_cfg(synthetic_data["root"], "logger.extra=[{name: x}]"), tmp_path / "b")
    with pytest.raises(RuntimeError, match="could not create nope.Logger"):
        finetune_train(smoke_cfg(synthetic_data["root"], "logger.extra=[{_target_: nope.Logger}]"), tmp_path / "c")


def test_resumed_csv_log_survives_a_ragged_file(tmp_path, caplog):
    """A metrics.csv with a row longer than its header (two writers, a crash mid-row) does not stop a
    resumed run: earlier rows are kept (without the stray fields), counted in a warning."""
    from pretrain.core.run.logs import ResumingCSVLogger

    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / "metrics.csv").write_text("epoch,step,train/loss\n0,0,1.5\n0,1,1.4,0.3,extra\n0,2,1.3\n")
    logger = ResumingCSVLogger(save_dir=str(tmp_path), name="logs", version="")
    with caplog.at_level("WARNING"):
        logger.log_metrics({"train/loss": 1.0, "val/AP": 0.1}, step=2)
        logger.save()
    rows = (log_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",") == ["epoch", "step", "train/loss", "val/AP"]
    assert rows[1:] == ["0,0,1.5,", "0,1,1.4,", ",2,1.0,0.1"]  # step 2 is logged again by the resumed run
    assert "1 row(s) had more fields than its header" in caplog.text
