"""What every SSL method shares: backbone, optimiser and schedule, logging, kNN probe, resumable state.

A method subclasses :class:`SSLMethod`, builds its lightly heads and loss in ``__init__`` and
implements :meth:`SSLMethod.compute_loss`. The module is built from the resolved run config (a
plain dict), which is stored as the checkpoint's ``hyper_parameters["config"]``: a bare
``last.ckpt`` is enough to rebuild the module or export the backbone, and it loads with
``torch.load(..., weights_only=True)`` because no module or custom object is pickled.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import hydra.utils
import pytorch_lightning as pl
import torch
from lightly.models.modules.memory_bank import MemoryBankModule
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback
from torch import Tensor, nn

from pretrain.core.backbone.resnet import FEATURE_DIMS, build_resnet
from pretrain.core.run.resume import batch_seed, mix, seed_all
from pretrain.core.run.schedule import ResumableLambdaLR, decay_split, lr_factor
from pretrain.data import tensor_views
from pretrain.methods.probe import KnnProbe

log = logging.getLogger(__name__)


def plain_config(config: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """The config as a resolved plain dict (what goes into checkpoints and backbone.json)."""
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    return OmegaConf.to_container(OmegaConf.create(dict(config)), resolve=True)  # type: ignore[return-value]


class SSLMethod(KnnProbe, pl.LightningModule):
    """Base LightningModule of one self-supervised method.

    Args:
        config: the resolved run config with at least ``method``, ``backbone``, ``optimizer``,
            ``scheduler``, ``data`` (``batch_size``) and ``knn`` sections (see conf/pretrain).

    Subclasses set ``self.backbone``'s companions (heads, loss) and implement
    :meth:`compute_loss`. The online backbone must stay ``self.backbone`` (torchvision names
    under the ``backbone.`` prefix is what export relies on); momentum copies go elsewhere.
    """

    def __init__(self, config: Mapping[str, Any] | DictConfig) -> None:
        super().__init__()
        config = plain_config(config)
        self.save_hyperparameters({"config": config})
        self.config = config
        self.method_cfg: dict[str, Any] = config["method"]
        bcfg = config["backbone"]
        self.backbone = build_resnet(bcfg["arch"], bcfg.get("norm", "bn"), bcfg.get("gn_groups", 32))
        self.feature_dim = FEATURE_DIMS[bcfg["arch"]]
        self.channels_last = bool(bcfg.get("channels_last", False))
        if self.channels_last:
            # Device moves preserve the format, so converting once here covers copies (momentum
            # encoders) and checkpoint loads (which copy into these tensors).
            self.backbone.to(memory_format=torch.channels_last)
        # Counters that the backbone file reports; buffers so that they resume with the weights.
        self.images_seen: Tensor
        self.epochs_done: Tensor
        self.register_buffer("images_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("epochs_done", torch.zeros((), dtype=torch.long))
        self._val_features: list[Tensor] = []
        self._val_labels: list[Tensor] = []
        self._val_index: list[Tensor] = []
        # The kNN probe of the backbone as initialised (the random-features reference every trained
        # figure is read against) and the probe after each validation; both go into checkpoints.
        self.knn_step0: float | None = None
        self.knn_history: list[dict[str, float]] = []
        self._epoch_loss_sum = 0.0
        self._epoch_loss_n = 0
        self.last_epoch_loss: float | None = None
        # data.augment=tensor: the loader yields uint8 images and the views are made on the device.
        self.tensor_views = tensor_views(config.get("data", {}), self.method_cfg.get("transform", {}))

    # ------------------------------------------------------------------------------- interface
    def compute_loss(self, views: Sequence[Tensor]) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Loss of one batch of augmented views and extra scalars to log.

        Args:
            views: one ``(B, 3, H, W)`` tensor per view, in the order the transform made them.
        """
        raise NotImplementedError

    def method_callbacks(self) -> list[Callback]:
        """Callbacks the method wants (collapse warnings); none by default."""
        return []

    def resolved_settings(self) -> dict[str, Any]:
        """Settings derived at run time from ``auto`` config values (recorded in metrics.json and
        backbone.json's ``method_settings``); none by default."""
        return {}

    # ---------------------------------------------------------------------------------- helpers
    def prepare_input(self, x: Tensor) -> Tensor:
        """Put an image batch into the memory format the backbone runs in."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def embed_grouped(self, views: Sequence[Tensor], backbone: nn.Module | None = None) -> list[Tensor]:
        """Backbone features of every view.

        Consecutive views of one resolution go through the backbone as one batch, as the SwAV and
        SimCLR reference code does: fewer, larger convolutions are faster, and BN sees all of them.
        """
        net = backbone if backbone is not None else self.backbone
        out: list[Tensor] = []
        i = 0
        while i < len(views):
            j = i + 1
            while j < len(views) and views[j].shape == views[i].shape:
                j += 1
            feats = net(self.prepare_input(torch.cat(list(views[i:j])) if j - i > 1 else views[i]))
            out.extend(feats.chunk(j - i))
            i = j
        return out

    def global_batch_size(self) -> int:
        """Images per optimiser step over all processes (the LR scaling rule's batch)."""
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        return int(self.config["data"]["batch_size"]) * self.world_size * accumulate

    def feature_maps(self, x: Tensor, backbone: nn.Module | None = None) -> Tensor:
        """The last stage's ``(B, C, H/32, W/32)`` feature map, before the global pooling.

        Dense and region-level methods (DenseCL, DetCon) contrast locations or mask-pooled regions
        of this map; ``forward`` is its spatial mean.
        """
        net = backbone if backbone is not None else self.backbone
        x = self.prepare_input(x)
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))  # type: ignore[operator]
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))  # type: ignore[operator]

    # -------------------------------------------------------------------------------- training
    def forward(self, x: Tensor) -> Tensor:
        """Pooled backbone features (what the backbone file exports)."""
        return self.backbone(self.prepare_input(x))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this on the device, after the transfer: the tensor path's views are made
        # here, batched, instead of per image in the loader (validation batches pass through).
        if self.tensor_views is not None and self._trainer is not None and self.trainer.training:
            # Lightning calls this before on_train_batch_start (where DeterministicResume reseeds):
            # seed the views from (seed, epoch, batch index, rank) here, so a resumed run makes the same.
            batch_idx = int(self.trainer.fit_loop.epoch_loop.batch_progress.current.ready)
            seed_all(mix(batch_seed(int(self.config.get("seed", 0)), self.trainer, batch_idx), 5))
            images, sizes = batch
            return self.tensor_views(images, sizes)
        return batch

    def on_train_epoch_start(self) -> None:
        self._epoch_loss_sum, self._epoch_loss_n = 0.0, 0

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        views = list(batch)
        loss, stats = self.compute_loss(views)
        batch_size = views[0].shape[0]
        self.images_seen += batch_size * self.world_size
        self.log("train_loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in stats.items():
            self.log(name, value, batch_size=batch_size)
        if torch.isfinite(loss.detach()):
            self._epoch_loss_sum += float(loss.detach())
            self._epoch_loss_n += 1
        return loss

    def on_train_epoch_end(self) -> None:
        # Runs before ModelCheckpoint's epoch-end save, so last.ckpt counts this epoch. Set from the
        # epoch index, not incremented: a run resumed from a step checkpoint taken at an epoch's last
        # batch does not run that epoch's end again, and a count would lose it.
        self.epochs_done.fill_(self.trainer.current_epoch + 1)
        if self._epoch_loss_n:
            self.last_epoch_loss = self._epoch_loss_sum / self._epoch_loss_n

    # ---------------------------------------------------------------------- optimiser, schedule
    def configure_optimizers(self) -> Any:
        # optimizer: a partial torch optimizer (_target_ + its arguments, as in fine-tuning) plus our
        # base_lr (at a global batch of 256) and exclude_bias_and_norm; scheduler: lr_factor's arguments.
        ocfg = dict(self.config["optimizer"])
        if "_target_" not in ocfg:
            raise ValueError("optimizer needs _target_ (e.g. torch.optim.SGD) and its arguments at its top "
                             "level, as in conf/pretrain/optimizer/*.yaml (the former optimizer.factory block)")
        base_lr = float(ocfg.pop("base_lr"))
        exclude_bias_and_norm = bool(ocfg.pop("exclude_bias_and_norm", True))
        weight_decay = float(ocfg.pop("weight_decay"))
        lr = base_lr * self.global_batch_size() / 256
        trainable = [m for m in self.children() if any(p.requires_grad for p in m.parameters())]
        if exclude_bias_and_norm:
            decay, no_decay = decay_split(trainable)
        else:
            decay, no_decay = [p for m in trainable for p in m.parameters()], []
        groups = [
            {"name": "decay", "params": [p for p in decay if p.requires_grad], "weight_decay": weight_decay},
            # LARS also skips its layer-wise scaling for weight_decay == 0 (as SimCLR/BYOL do).
            {"name": "no_decay", "params": [p for p in no_decay if p.requires_grad], "weight_decay": 0.0},
        ]
        # _convert_="all": plain lists (AdamW betas) in the optimizer state, so that checkpoints
        # still load with weights_only=True.
        factory = hydra.utils.instantiate(ocfg, _convert_="all")
        optimizer = factory([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)

        total = max(int(self.trainer.estimated_stepping_batches), 1)
        steps_per_epoch = max(
            math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches), 1
        ) if math.isfinite(self.trainer.num_training_batches) else total
        scfg = dict(self.config["scheduler"])
        # The warmup is given in epochs (the papers' unit) and not capped at a tenth of the run.
        warmup = min(round(float(scfg.pop("warmup_epochs", 0)) * steps_per_epoch), total)
        factor = partial(lr_factor, total_steps=total, warmup_steps=warmup, max_warmup_fraction=1.0, **scfg)
        scheduler = ResumableLambdaLR(optimizer, factor)
        log.info("lr %.4g (base %.4g x global batch %d / 256), %s schedule, %d warmup of %d steps",
                 lr, base_lr, self.global_batch_size(), scfg.get("name", "step"), warmup, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -------------------------------------------------------------------- resumable side state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # lightly's memory banks keep their contents in non-persistent buffers; without this,
        # a resumed MoCo run would restart from a random queue.
        banks = {
            name: {"bank": m.bank.detach().cpu().clone(), "ptr": m.bank_ptr.detach().cpu().clone()}
            for name, m in self.named_modules()
            if isinstance(m, MemoryBankModule) and m.size[0] > 0
        }
        if banks:
            checkpoint["memory_banks"] = banks
        # The running epoch's loss average, so a mid-epoch resume reports the whole epoch's.
        checkpoint["epoch_loss"] = {"sum": self._epoch_loss_sum, "n": self._epoch_loss_n}
        # The step-0 reference cannot be measured again after a resume: it travels with the weights.
        checkpoint["knn"] = {"step0": self.knn_step0, "history": [dict(h) for h in self.knn_history]}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        running = checkpoint.get("epoch_loss") or {}
        # (An epoch-end checkpoint: on_train_epoch_start resets them for the next epoch.)
        self._epoch_loss_sum, self._epoch_loss_n = float(running.get("sum", 0.0)), int(running.get("n", 0))
        knn = checkpoint.get("knn") or {}
        self.knn_step0 = None if knn.get("step0") is None else float(knn["step0"])
        self.knn_history = [dict(h) for h in knn.get("history", [])]
        saved = checkpoint.get("memory_banks", {})
        for name, m in self.named_modules():
            if isinstance(m, MemoryBankModule) and name in saved:
                bank = saved[name]["bank"]
                if bank.shape != m.bank.shape:
                    raise ValueError(
                        f"checkpoint memory bank {name} has shape {tuple(bank.shape)} but the config "
                        f"builds {tuple(m.bank.shape)}; resume with the config the run started with"
                    )
                m.bank.copy_(bank)
                m.bank_ptr.copy_(saved[name]["ptr"])
