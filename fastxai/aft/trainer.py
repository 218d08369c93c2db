"""Activation fine-tuning, Eq. 8 of Han, Lee and Lee (2022), §4.2.

.. math::
    \\min_{w_1, w_2, w'} \\frac1n \\sum_i \\mathrm{CE}(f(x_i; w_0, w_1, w_2), y_i)
    + \\lambda \\, \\lVert t(A(x_i; w_1); w') - \\mathrm{pool}(M_{\\tau^*}(x_i)) \\rVert_2^2

:math:`w_0` (every parameter that feeds the tuned layer ℓ from before it) is frozen, :math:`w_1`
is layer ℓ, :math:`w_2` the rest of the network, :math:`t` the :class:`~fastxai.aft.Tuner`. The
trainer works on a deep copy of the model with BatchNorm in eval mode and returns a state dict of
the original architecture (no tuner inside), so every CAM method runs on the tuned model unchanged.

Under ``torchrun`` the network is wrapped in DistributedDataParallel and the data is split by a
:class:`~torch.utils.data.DistributedSampler`; ``batch_size`` is the global batch, so N ranks
with ``batch_size / N`` images each take the same optimisation steps as one process.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from fastxai import distributed
from fastxai.aft.tuner import Tuner, tuner_loss
from fastxai.io import atomic_save

Optimiser = Literal["sgd", "adam", "adamw"]
TunerInit = Literal["random", "mean"]
# Fields that may change between a run and its resumption without changing its result.
_RESUMABLE_CHANGES = {"epochs", "compile", "progress"}


@dataclass
class AFTConfig:
    """Hyperparameters of Eq. 8. The paper gives none; the defaults are ours (docs in this module).

    Attributes:
        lam: :math:`\\lambda`, the weight of the mask term.
        reduction: the mask term per image as a ``"mean"`` over the ``h*w`` cells or a ``"sum"``.
        optimizer: ``"sgd"`` (with ``momentum``), ``"adam"`` or ``"adamw"``.
        lr, momentum, weight_decay: optimiser settings (weight decay on every trained parameter).
        epochs: passes over the training set; batch_size: global batch (divided among ranks).
        seed: seeds the tuner's initialisation and each epoch's shuffle (``seed + epoch``).
        linear: the tuner without ReLU and sigmoid (the paper's literal reading).
        tuner_init: ``"random"`` (PyTorch's default initialisation of both 1x1 convolutions) or
            ``"mean"``: the tuner starts at the constant :math:`\bar m`, the mean of all targets
            (:meth:`~fastxai.aft.Tuner.start_at`). A random tuner's output is far from the
            targets' mean, and the mask term then pushes layer ℓ towards the mean map. That push
            costs accuracy and carries no per-image information. With ``"mean"`` the mask
            term starts at the targets' variance, and only what the tuner learns beyond the mean
            reaches layer ℓ.
        compile: run the loss (network + tuner) through ``torch.compile``.
        progress: show a tqdm bar on rank 0.
    """

    lam: float = 1.0
    reduction: Literal["mean", "sum"] = "mean"
    optimizer: Optimiser = "sgd"
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 1
    batch_size: int = 64
    seed: int = 0
    linear: bool = False
    tuner_init: TunerInit = "random"
    compile: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {self.reduction!r}")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {self.optimizer!r}")
        if self.tuner_init not in ("random", "mean"):
            raise ValueError(f"tuner_init must be 'random' or 'mean', got {self.tuner_init!r}")
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs must be >= 0, batch_size >= 1 and lr > 0")


@dataclass
class AFTResult:
    """``state_dict``: the tuned model (original architecture); ``tuner``: the tuner's state;
    ``history``: per epoch, the mean ``loss``, ``ce`` and ``mask`` terms on this rank."""

    state_dict: dict[str, Tensor]
    tuner: dict[str, Tensor]
    history: list[dict[str, float]] = field(default_factory=list)


class _TunedNetwork(nn.Module):
    """``x -> (logits, tuner(A))`` with ``A`` the output of ``model.<layer>``, read by a hook."""

    def __init__(self, model: nn.Module, layer: str, tuner: Tuner) -> None:
        super().__init__()
        self.model = model
        self.tuner = tuner
        self._captured: dict[str, Tensor] = {}
        self._handle = model.get_submodule(layer).register_forward_hook(self._keep)

    def _keep(self, _module: nn.Module, _inputs: Any, output: Tensor) -> None:
        self._captured["activation"] = output

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(x)
        activation = self._captured.pop("activation")
        return logits, self.tuner(activation)

    def detach_hook(self) -> None:
        self._handle.remove()


def frozen_parameter_names(model: nn.Module, layer: str, sample: Tensor) -> list[str]:
    """Names of :math:`w_0`: parameters outside ``layer`` that the layer's output depends on.

    Found by one forward of ``sample`` in eval mode (no running statistic changes) and the
    gradient of the layer output's sum: a parameter gets a (possibly zero) gradient exactly when
    the activation is computed from it.
    """
    target = model.get_submodule(layer)
    own = {id(p) for p in target.parameters()}
    captured: list[Tensor] = []
    handle = target.register_forward_hook(lambda _m, _i, out: captured.append(out))
    was_training = model.training
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    try:
        model.eval()
        with torch.enable_grad():
            model(sample)
            grads = torch.autograd.grad(captured[0].sum(), [p for _, p in named], allow_unused=True)
    finally:
        handle.remove()
        model.train(was_training)
    return [n for (n, p), g in zip(named, grads, strict=True) if g is not None and id(p) not in own]


def _batchnorm_eval(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


class AFTTrainer:
    """Fine-tune a copy of ``model`` at ``layer`` with Eq. 8.

    Args:
        model: the trained classifier (never modified; a deep copy is tuned).
        layer: dotted name of the layer ℓ (the CAM layer the masks were made for).
        config: hyperparameters (:class:`AFTConfig`).
        context: distributed context (default: the initialised process group, if any; the
            model's device otherwise).

    Usage::

        targets = load_targets("masks/")["target"]          # (N, h, w), from generate_masks
        result = AFTTrainer(model, "layer3").fit(x, y, targets, checkpoint="aft.pt")
        tuned = copy.deepcopy(model); tuned.load_state_dict(result.state_dict)
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        config: AFTConfig | None = None,
        context: distributed.Context | None = None,
    ) -> None:
        self.config = config or AFTConfig()
        device = next(model.parameters()).device
        self.context = context or distributed.current(device)
        self.layer = layer
        self.model = copy.deepcopy(model).to(self.context.device)
        self.model.get_submodule(layer)  # raises AttributeError with the name if missing

    def fit(
        self,
        images: Tensor,
        labels: Tensor,
        targets: Tensor,
        checkpoint: str | os.PathLike[str] | None = None,
    ) -> AFTResult:
        """Train on ``images`` ``(N, C, H, W)``, ``labels`` ``(N,)`` and mask ``targets``
        ``(N, h, w)``; any tensor-like indexable by a long tensor works (e.g. a memory-mapped one).

        With ``checkpoint``, the state after each epoch is saved there atomically (rank 0), and a
        run finding a checkpoint continues after its last epoch with the result an uninterrupted
        run would have had (a checkpoint of other hyperparameters raises ``ValueError``).
        """
        cfg, ctx = self.config, self.context
        if not (len(images) == len(labels) == len(targets)):
            raise ValueError(
                f"images ({len(images)}), labels ({len(labels)}) and targets ({len(targets)}) "
                "must have one row per training image"
            )
        if len(images) == 0:
            raise ValueError("images: AFT needs at least one training image")
        if cfg.batch_size % ctx.world_size:
            raise ValueError(
                f"batch_size {cfg.batch_size} must be divisible by the {ctx.world_size} ranks"
            )
        device = ctx.device
        model = self.model
        frozen = set(frozen_parameter_names(model, self.layer, images[:1].to(device)))
        for name, parameter in model.named_parameters():
            if name in frozen:
                parameter.requires_grad_(False)
        with torch.no_grad():
            model.eval()
            probe: list[Tensor] = []
            handle = model.get_submodule(self.layer).register_forward_hook(
                lambda _m, _i, out: probe.append(out)
            )
            model(images[:1].to(device))
            handle.remove()
        channels = probe[0].shape[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            tuner = Tuner(channels, linear=cfg.linear).to(device)
        if cfg.tuner_init == "mean":
            tuner.start_at(float(targets[:].float().mean()))
        network = _TunedNetwork(model, self.layer, tuner)
        trainable = [p for p in network.parameters() if p.requires_grad]
        optimiser = _make_optimiser(cfg, trainable)
        history: list[dict[str, float]] = []
        start_epoch = 0
        if checkpoint is not None and Path(checkpoint).exists():
            state = torch.load(checkpoint, map_location=device, weights_only=True)
            _check_resumable(state["config"], asdict(cfg), checkpoint)
            model.load_state_dict(state["model"])
            tuner.load_state_dict(state["tuner"])
            optimiser.load_state_dict(state["optimizer"])
            history = list(state["history"])
            start_epoch = int(state["epoch"])

        model.train()
        _batchnorm_eval(model)
        wrapped: nn.Module = network
        if ctx.distributed:
            ids = [device] if device.type == "cuda" else None
            wrapped = DistributedDataParallel(network, device_ids=ids)

        def loss_terms(x: Tensor, y: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            logits, tuned = wrapped(x)
            ce = F.cross_entropy(logits, y)
            mask_term = tuner_loss(tuned, target, cfg.reduction)
            return ce + cfg.lam * mask_term, ce.detach(), mask_term.detach()

        # The training pattern that compiles: the loss function is compiled,
        # backward and the optimiser step run outside. DDP's bucketing splits the graph, so
        # fullgraph is only asked for in a single process.
        step_loss = (
            torch.compile(loss_terms, fullgraph=not ctx.distributed) if cfg.compile else loss_terms
        )
        sampler = DistributedSampler(
            range(len(images)),
            num_replicas=ctx.world_size,
            rank=ctx.rank,
            shuffle=True,
            seed=cfg.seed,
        )
        local_batch = cfg.batch_size // ctx.world_size
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler), dtype=torch.long)
            sums = torch.zeros(3, dtype=torch.float64)
            batches = order.split(local_batch)
            for batch in tqdm(
                batches,
                desc=f"AFT epoch {epoch + 1}/{cfg.epochs}",
                disable=not (cfg.progress and ctx.is_main),
                leave=False,
            ):
                x = images[batch].to(device, non_blocking=True)
                y = labels[batch].to(device, non_blocking=True)
                target = targets[batch].to(device, non_blocking=True)
                loss, ce, mask_term = step_loss(x, y, target)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                sums += torch.stack([loss.detach(), ce, mask_term]).double().cpu() * len(batch)
            sums /= max(len(order), 1)
            history.append({"loss": float(sums[0]), "ce": float(sums[1]), "mask": float(sums[2])})
            if checkpoint is not None and ctx.is_main:
                atomic_save(
                    {
                        "epoch": epoch + 1,
                        "model": model.state_dict(),
                        "tuner": tuner.state_dict(),
                        "optimizer": optimiser.state_dict(),
                        "history": history,
                        "config": asdict(cfg),
                        "layer": self.layer,
                    },
                    checkpoint,
                )
            ctx.barrier()
        network.detach_hook()
        model.eval()
        return AFTResult(
            state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
            tuner={k: v.detach().clone() for k, v in tuner.state_dict().items()},
            history=history,
        )


def _make_optimiser(cfg: AFTConfig, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _check_resumable(saved: dict[str, Any], wanted: dict[str, Any], path: object) -> None:
    # A field the checkpoint lacks (written before the field existed) had its default value.
    defaults = asdict(AFTConfig())
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    differs = sorted(
        k
        for k in set(saved) | set(wanted)
        if k not in _RESUMABLE_CHANGES and saved.get(k) != wanted.get(k)
    )
    if differs:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in differs)
        raise ValueError(
            f"checkpoint {path} was written with other hyperparameters ({detail}); "
            "use a new checkpoint path to start over"
        )


def train_aft(
    model: nn.Module,
    layer: str,
    images: Tensor,
    labels: Tensor,
    targets: Tensor,
    config: AFTConfig | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> AFTResult:
    """Functional form of :class:`AFTTrainer`: ``AFTTrainer(model, layer, config).fit(...)``."""
    return AFTTrainer(model, layer, config).fit(images, labels, targets, checkpoint)
