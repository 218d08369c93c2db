"""Sharing Ratio Decomposition (SRD): saliency, effective receptive fields, APOP."""

from fastxai.decomposition.activation_pattern import apop, apop_agreement
from fastxai.decomposition.explain import srd, srd_erf
from fastxai.decomposition.support import UnsupportedModelError

__all__ = ["UnsupportedModelError", "apop", "apop_agreement", "srd", "srd_erf"]
