"""Activation Matching (SPEC.md §C): per-image U-Net mask generators trained so that the masked
image reproduces the classifier's activations and prediction with as few pixels as possible.

``generator``: the batched U-Net and the straight-through mask; ``features``: the traced
classifier and default layers; ``losses``: the per-image terms and weights; ``trainer``: the
compiled step and the loop; ``api``: :func:`activation_matching`; ``amortised``: one generator
trained over many images (by default ``feature_decoder``, a decoder of the classifier's features).
"""

from fastxai.matching.api import activation_matching
from fastxai.matching.features import MatchedLayer, default_layers
from fastxai.matching.losses import TERMS, LossWeights

__all__ = ["TERMS", "LossWeights", "MatchedLayer", "activation_matching", "default_layers"]
