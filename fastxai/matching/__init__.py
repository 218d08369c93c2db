"""Activation Matching: minimal binary masks whose masked image keeps the classifier's activations
and prediction (Suhail, Anand, Sethi 2025).

``api``: :func:`activation_matching` and its two recipes; ``ladder``: the stable recipe (greedy
cell deletion under the paper's loss, an area ladder, no seed); ``paper``: the authors' notebook
recipe, whose ``generator`` (per-image U-Nets, straight-through mask) and ``trainer`` (the
compiled step and the loop) it trains; ``features``: the traced classifier and default layers;
``losses``: the per-image terms and weights; ``robustness``: masks under noise and blur
backgrounds; ``amortised``: one generator trained over many images (by default
``feature_decoder``, a decoder of the classifier's features).
"""

from fastxai.matching.api import activation_matching
from fastxai.matching.features import MatchedLayer, default_layers
from fastxai.matching.losses import TERMS, LossWeights

__all__ = ["TERMS", "LossWeights", "MatchedLayer", "activation_matching", "default_layers"]
