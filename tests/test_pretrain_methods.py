"""Every SSL method: finite loss, gradients everywhere they belong, optimiser steps, SwAV specifics."""

from __future__ import annotations

import logging
from unittest.mock import PropertyMock, patch

import hydra.utils
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import compose_config
from lightly.utils.lars import LARS
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pretrain.methods.base import SSLMethod, plain_config
from pretrain.methods.moco import auto_queue_size, resize_queue

METHODS = ("swav", "vicreg", "moco", "simclr", "densecl", "detcon")


def smoke_config(method: str, *overrides: str) -> dict:
    cfg = compose_config("pretrain", overrides=["experiment=smoke", f"method={method}", *overrides])
    return plain_config(cfg)


def build(config: dict) -> SSLMethod:
    return hydra.utils.get_class(config["method"]["module"])(config)


class NoiseImages(Dataset):
    """Random RGB images through the method's real (lightly) transform."""

    def __init__(self, n: int, transform, size: int = 72) -> None:
        rng = np.random.default_rng(0)
        pixels = (rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n))
        self.images = [Image.fromarray(p) for p in pixels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i])


def loader(config: dict, n: int = 16) -> DataLoader:
    transform = hydra.utils.instantiate(config["method"]["transform"])
    return DataLoader(NoiseImages(n, transform), batch_size=config["data"]["batch_size"], shuffle=True,
                      drop_last=True)


def fit(model: SSLMethod, dl: DataLoader, callbacks=(), **kwargs) -> pl.Trainer:
    args = {"accelerator": "cpu", "max_epochs": 1, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "precision": "32"}
    args.update(kwargs)
    trainer = pl.Trainer(callbacks=list(callbacks), **args)
    trainer.fit(model, dl)
    return trainer


@pytest.mark.parametrize("method", METHODS)
def test_every_trainable_parameter_gets_a_gradient(method):
    config = smoke_config(method, "method.freeze_prototypes_iters=0" if method == "swav" else "seed=0")
    model = build(config)
    model.train()
    views = next(iter(loader(config)))
    loss, _ = model.compute_loss(views)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{method}: {name} got no gradient"
            assert torch.isfinite(p.grad).all(), name
        else:  # only the momentum (key) encoders and heads are frozen
            assert name.split(".")[0].endswith("_momentum"), f"{name} is frozen"
    if method in ("moco", "densecl"):
        assert any(n.startswith("backbone_momentum.") for n, _ in model.named_parameters())
    if method == "densecl":
        assert any(n.startswith("dense_head_momentum.") for n, _ in model.named_parameters())


@pytest.mark.parametrize("method", METHODS)
def test_optimisation_steps_with_finite_loss(method):
    config = smoke_config(method)
    model = build(config)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = fit(model, loader(config), [Record()], precision="bf16-mixed")
    assert trainer.global_step == 2 and len(losses) == 2
    assert all(np.isfinite(losses))
    changed = [k for k, v in model.backbone.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, before[k])]
    assert "conv1.weight" in changed and "layer4.1.conv2.weight" in changed
    assert int(model.images_seen) == 16


def test_swav_prototypes_stay_frozen_for_their_iterations():
    # Plain SGD with a large LR: LARS' trust ratio would make the first update too small to see.
    config = smoke_config("swav", "method.freeze_prototypes_iters=2", "method.queue_length=0",
                          "optimizer=sgd", "optimizer.base_lr=50")
    model = build(config)
    initial = model.prototypes.heads[0].weight.detach().clone()
    seen = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(pl_module.prototypes.heads[0].weight.detach().clone())

    fit(model, loader(config, n=32), [Record()])
    assert len(seen) == 4
    assert torch.allclose(seen[0], initial, atol=1e-6) and torch.allclose(seen[1], initial, atol=1e-6)
    assert not torch.allclose(seen[2], initial, atol=1e-3)
    assert model.prototypes.heads[0].bias is None


def test_swav_queue_switches_on_at_its_start_epoch():
    bs = 8
    config = smoke_config("swav", f"method.queue_length={bs}", "method.queue_start_epoch=1")
    model = build(config)
    record = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            record.append((trainer.current_epoch, int(pl_module.queue_count),
                           float(trainer.callback_metrics["swav_queue_used"])))

    fit(model, loader(config, n=2 * bs), [Record()], max_epochs=3)
    assert [r[0] for r in record] == [0, 0, 1, 1, 2, 2]
    # Epoch 0: nothing queued or used. Epoch 1: filling; full after one batch, used from the next.
    assert record[0][1:] == (0, 0.0) and record[1][1:] == (0, 0.0)
    assert record[2][1:] == (bs, 0.0) and record[3][1:] == (bs, 1.0)
    assert record[4][2] == 1.0 and record[5][2] == 1.0
    assert model.queue.abs().sum() > 0
    assert "queue" in model.state_dict() and "queue_count" in model.state_dict()


@pytest.mark.parametrize("queue_size", ["auto", "24"])
def test_moco_queue_survives_a_checkpoint_round_trip(queue_size):
    config = smoke_config("moco", f"method.queue_size={queue_size}")
    model = build(config)
    bank = model.criterion.memory_bank
    if queue_size == "auto":  # as sized by on_train_start for the data of the run that saved it
        resize_queue(bank, 24)
    bank.bank.normal_()
    bank.bank_ptr.fill_(5)
    ckpt: dict = {}
    model.on_save_checkpoint(ckpt)
    other = build(config)
    assert other.criterion.memory_bank.bank.shape[0] == (8 if queue_size == "auto" else 24)  # auto: one batch
    other.on_load_checkpoint(ckpt)
    # A resumed auto queue keeps the length it was given when the run started (and its keys).
    assert torch.equal(other.criterion.memory_bank.bank, bank.bank) and other.resolved_settings() == {
        "queue_length": 24}
    assert int(other.criterion.memory_bank.bank_ptr) == 5


@pytest.mark.parametrize("num_images, keys_per_step, expected", [
    (1000, 64, 64),            # 10% = 100 -> one global batch
    (10000, 64, 960),          # 1000 rounded down to 15 batches
    (1_281_167, 256, 65536),   # ImageNet: the paper's 65536 (the cap)
    (1_000_000, 96, 65472),    # the cap, rounded down to a multiple of the batch
    (32, 8, 8),                # fewer images than ten batches: one batch
])
def test_auto_queue_is_a_tenth_of_the_images_in_whole_batches(num_images, keys_per_step, expected):
    assert auto_queue_size(num_images, keys_per_step) == expected
    with pytest.raises(ValueError, match="positive"):
        auto_queue_size(0, keys_per_step)


def test_moco_auto_queue_is_sized_to_the_data_when_training_starts(caplog):
    config = smoke_config("moco", "data.batch_size=4")
    assert config["method"]["queue_size"] == "auto"  # the default
    model = build(config)
    assert model.criterion.memory_bank.bank.shape == (4, 32)  # one batch until the data is known
    with caplog.at_level(logging.INFO, logger="pretrain.methods.moco"):
        fit(model, loader(config, n=80), max_steps=1)
    assert model.criterion.memory_bank.bank.shape == (8, 32)  # 10% of 80 images, two batches of 4
    assert "moco queue: 8 keys (method.queue_size=auto: 10% of 80 images" in caplog.text
    assert model.resolved_settings() == {"queue_length": 8}


def test_moco_auto_queue_without_a_sized_dataset_stays_one_batch_and_says_so():
    config = smoke_config("moco")

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(NoiseImages(16, hydra.utils.instantiate(config["method"]["transform"])))

    model = build(config)
    with pytest.warns(UserWarning, match="auto needs a training set of known size.*8 keys"):
        fit(model, DataLoader(Stream(), batch_size=8), max_steps=1)
    assert model.criterion.memory_bank.bank.shape == (8, 32)


def test_moco_explicit_queue_is_honoured_and_a_queue_longer_than_the_data_warned_about():
    config = smoke_config("moco", "method.queue_size=24")
    model = build(config)
    with pytest.warns(UserWarning, match="longer than the 16 training images.*method.queue_size=auto"):
        fit(model, loader(config, n=16), max_steps=1)
    assert model.criterion.memory_bank.bank.shape == (24, 32)
    with pytest.raises(ValueError, match="method.queue_size='many'"):
        build(smoke_config("moco", "method.queue_size=many"))


def test_moco_momentum_encoder_follows_the_online_one():
    config = smoke_config("moco", "method.momentum_start=0.5", "method.momentum_end=0.5")
    model = build(config)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    pairs = zip(model.backbone_momentum.parameters(), model.backbone.parameters())
    target = [(0.5 * m + 0.5 * o).clone() for m, o in pairs]
    model.compute_loss(next(iter(loader(config))))
    for t, m in zip(target, model.backbone_momentum.parameters()):
        assert torch.allclose(t, m)


def test_lr_scales_with_the_global_batch_and_skips_decay_on_bias_and_norm():
    config = smoke_config("simclr", "optimizer.base_lr=0.4", "data.batch_size=8")
    model = build(config)
    trainer = fit(model, loader(config), max_steps=1)
    opt = trainer.optimizers[0]
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["decay"]["initial_lr"] == pytest.approx(0.4 * 8 / 256)
    assert groups["no_decay"]["weight_decay"] == 0.0
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert id(model.backbone.bn1.weight) in no_decay and id(model.backbone.bn1.bias) in no_decay
    assert id(model.backbone.conv1.weight) not in no_decay


def test_swav_collapse_diagnostics_tell_one_point_from_spread_embeddings():
    """swav_embedding_cos / swav_code_entropy (logged every step) read ~1 when every image maps
    to one point and clearly less when the embeddings are spread."""
    model = build(smoke_config("swav"))
    prototypes = model.prototypes.heads[0].weight.detach()
    spread = torch.nn.functional.normalize(prototypes[:8] + 0.05 * torch.randn(8, prototypes.shape[1]), dim=1)
    collapsed = torch.nn.functional.normalize(prototypes.mean(0, keepdim=True), dim=1).repeat(8, 1)
    out = {}
    for name, z in (("spread", spread), ("collapsed", collapsed)):
        stats = model._collapse_stats(z, model.prototypes(z))
        out[name] = (float(stats["swav_embedding_cos"]), float(stats["swav_code_entropy"]))
    assert out["collapsed"][0] > 0.999 and out["collapsed"][1] > 0.99
    assert out["spread"][0] < 0.5 and out["spread"][1] < 0.8
    # And they reach the logs of a real training step.
    logged = {}

    class Grab(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    fit(model, loader(smoke_config("swav")), [Grab()], max_steps=1)
    assert 0.0 < logged["swav_code_entropy"] <= 1.0 + 1e-6 and -1.0 <= logged["swav_embedding_cos"] <= 1.0


def test_moco_momentum_is_the_papers_constant_unless_cosine_is_asked_for():
    config = smoke_config("moco")
    assert config["method"]["momentum_schedule"] == "constant"
    model = build(config)
    fit(model, loader(config), max_steps=2)
    assert model.momentum() == 0.999  # at every step, as MoCo v2's code keeps m fixed
    cosine = build(smoke_config("moco", "method.momentum_schedule=cosine", "method.momentum_end=1.0"))
    trainer = fit(cosine, loader(config), max_steps=2)
    assert 0.999 < cosine.momentum() <= 1.0 and trainer.global_step == 2
    with pytest.raises(ValueError, match="momentum_schedule"):
        build(smoke_config("moco", "method.momentum_schedule=linear")).momentum()


def test_swav_queue_length_is_global_and_split_over_processes():
    config = smoke_config("swav", "method.queue_length=64", "data.batch_size=8")
    model = build(config)
    model.size_queue(4)  # as on 4 GPUs: the paper's 3840 = 4 x 960
    assert model.queue_length == 16 and model.queue.shape == (model.num_high, 16, model.queue.shape[2])
    model.size_queue(1)
    assert model.queue_length == 64
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        model.size_queue(3)
    with pytest.raises(ValueError, match="fewer than one batch"):
        build(smoke_config("swav", "method.queue_length=16", "data.batch_size=8")).size_queue(4)


DEMO_PRESETS = {"simclr": "experiment=demo", "swav": "experiment=demo_swav", "densecl": "experiment=demo_densecl",
                "detcon": "experiment=demo_detcon"}


def demo_config(method: str) -> dict:
    """The method's make-demo preset; a method without one keeps its paper's settings."""
    return plain_config(compose_config("pretrain", overrides=[DEMO_PRESETS.get(method, f"method={method}")]))


@pytest.mark.parametrize("method,optimizer", [("swav", torch.optim.SGD), ("simclr", torch.optim.SGD),
                                              ("vicreg", LARS)])
def test_demo_presets_switch_to_sgd(method, optimizer):
    # The demo presets' SGD is part of their small-budget recipe (experiment/demo*.yaml select it in
    # their own defaults list); a method without a demo preset keeps its paper's optimizer and LR.
    demo = demo_config(method)
    assert demo["method"]["name"] == method
    paper = smoke_config(method)["optimizer"]
    if method not in DEMO_PRESETS:
        assert demo["optimizer"] == paper
    # The demo's optimizer and schedule sections on a smoke-sized model: what configure_optimizers builds.
    config = {**smoke_config(method, "data.batch_size=8"), "optimizer": demo["optimizer"],
              "scheduler": demo["scheduler"]}
    trainer = fit(build(config), loader(config), max_steps=1)
    opt = trainer.optimizers[0]
    assert type(opt) is optimizer
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(demo["optimizer"]["base_lr"] * 8 / 256)
    assert opt.param_groups[0]["momentum"] == 0.9


def test_schedule_reads_the_scheduler_section_with_warmup_in_epochs():
    # 4 steps in the epoch: warmup_epochs=0.5 is 2 steps from 0, then cosine down towards min_factor.
    config = smoke_config("simclr", "data.batch_size=8", "optimizer.base_lr=0.256",
                          "scheduler.warmup_epochs=0.5", "scheduler.min_factor=0.5")
    lrs = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    fit(build(config), loader(config, n=32), [Record()])
    assert lrs == pytest.approx([0.0, 0.004, 0.008, 0.006])  # lr = 0.256 x 8 / 256 = 0.008
    constant = smoke_config("simclr", "data.batch_size=8", "optimizer.base_lr=0.256",
                            "scheduler.name=constant")
    lrs.clear()
    fit(build(constant), loader(constant, n=32), [Record()])
    assert lrs == pytest.approx([0.008] * 4)


def test_swav_setup_sizes_the_queue_by_the_trainers_world_size():
    # What Lightning calls on each of 4 DDP processes, before a checkpoint's queue is restored into it.
    model = build(smoke_config("swav", "method.queue_length=3840", "data.batch_size=64"))
    with patch.object(type(model), "world_size", new_callable=PropertyMock, return_value=4):
        model.setup("fit")
    assert model.queue.shape[1] == 960  # the paper's 3840 global = 4 x 960
    with patch.object(type(model), "world_size", new_callable=PropertyMock, return_value=7), \
            pytest.raises(ValueError, match="queue_length=3840 is not divisible by the 7 processes"):
        model.setup("fit")


def test_an_optimizer_in_the_old_factory_layout_is_refused_with_the_new_one_named():
    config = smoke_config("simclr")
    config["optimizer"] = {"base_lr": 0.3, "weight_decay": 1e-6,
                           "factory": {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9}}
    with pytest.raises(ValueError, match="_target_ .* conf/pretrain/optimizer"):
        fit(build(config), loader(config), max_steps=1)


def test_a_demo_preset_refuses_another_method():
    """experiment=demo is SimCLR's recipe: method=swav with it would hand SwAV SimCLR's view settings."""
    from pretrain.train import check_config

    check_config(demo_config("swav"))  # its own preset: fine
    with pytest.raises(ValueError, match="use experiment=demo_swav"):
        check_config(plain_config(compose_config("pretrain", overrides=["method=swav", "experiment=demo"])))
