"""A small CNN for 28x28 grey images (Fashion-MNIST) and its plain supervised training."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

FASHION_CNN_LAYER = "layer3"  # the last convolutional block: the CAM layer and the AFT layer ℓ


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class FashionCNN(nn.Module):
    """conv-BN-ReLU x3 with two 2x2 max-pools (28 -> 14 -> 7), global average pool, linear.

    ``layer3`` outputs ``(N, width * 4, 7, 7)``: the layer CAMs are computed at and AFT tunes.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        self.layer1 = _block(in_channels, width)
        self.layer2 = _block(width, width * 2)
        self.layer3 = _block(width * 2, width * 4)
        self.fc = nn.Linear(width * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(self.layer1(x), 2)
        x = F.max_pool2d(self.layer2(x), 2)
        x = self.layer3(x)
        return self.fc(x.mean((2, 3)))


def train_classifier(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place with Adam on cross-entropy; returns the mean loss per epoch.

    The learning rate decays from ``lr`` to 0 on a cosine over all steps, so the model ends near
    a minimum (AFT's own cross-entropy term then has little left to gain). Shuffled with
    ``torch.Generator().manual_seed(seed + epoch)``; leaves the model in eval mode.
    """
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(steps, 1))
    history = []
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + epoch))
        total, count = 0.0, 0
        batches = order.split(batch_size)
        for batch in tqdm(
            batches,
            desc=f"classifier epoch {epoch + 1}/{epochs}",
            disable=not progress,
            leave=False,
        ):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
            count += len(batch)
        history.append(total / max(count, 1))
    model.eval()
    return history


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` (in its current mode) on ``images``, under inference mode."""
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            logits = model(images[start : start + batch_size])
            correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return correct / max(len(images), 1)
