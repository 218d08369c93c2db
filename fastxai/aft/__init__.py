"""Activation fine-tuning (AFT, Han, Lee and Lee 2022, §4.2).

1. :func:`generate_masks`: TFT masks of every training image with one CAM method, pooled to the
   explained layer's resolution, written in atomic resumable shards (``torchrun``-aware).
2. :class:`AFTTrainer` / :func:`train_aft`: Eq. 8 on a copy of the model; returns a state dict of
   the original architecture.
3. :mod:`fastxai.aft.evaluate`: the paper's Tables 3 and 4 (Average Increase / Drop, accuracy).

Fashion-MNIST (:func:`load_fashion_mnist`) and a small CNN (:class:`FashionCNN`) make a complete
example; the command line is ``fastxai aft pretrain|prepare|train|evaluate``.
"""

from fastxai.aft.data import load_fashion_mnist
from fastxai.aft.masks import generate_masks, load_targets, pool_mask
from fastxai.aft.models import FashionCNN
from fastxai.aft.trainer import AFTConfig, AFTResult, AFTTrainer, train_aft
from fastxai.aft.tuner import Tuner, tuner_loss

__all__ = [
    "AFTConfig",
    "AFTResult",
    "AFTTrainer",
    "FashionCNN",
    "Tuner",
    "generate_masks",
    "load_fashion_mnist",
    "load_targets",
    "pool_mask",
    "train_aft",
    "tuner_loss",
]
