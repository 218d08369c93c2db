"""Activation Matching: minimal binary masks whose masked image keeps the classifier's activations
and prediction (Suhail, Anand, Sethi 2025).

``api``: :func:`activation_matching` and its two recipes; ``ladder``: the stable recipe (greedy
cell deletion under the paper's loss, an area ladder, no seed); ``paper``: the authors' notebook
recipe, whose ``generator`` (per-image U-Nets, straight-through mask) and ``trainer`` (the
compiled step and the loop) it trains; ``features``: the traced classifier and default layers;
``losses``: the per-image terms and weights; ``robustness``: masks under noise and blur
backgrounds; ``amortised``: one decoder of the classifier's features (``feature_decoder``)
trained over many images with the real-time saliency losses (``saliency_losses``), which scores
the stable recipe's cells of a new image in one forward.
"""

from fastxai.matching.api import activation_matching
from fastxai.matching.features import MatchedLayer, default_layers
from fastxai.matching.losses import TERMS, LossWeights

__all__ = ["TERMS", "LossWeights", "MatchedLayer", "activation_matching", "default_layers"]
