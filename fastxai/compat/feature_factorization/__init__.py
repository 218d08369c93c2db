"""Deep Feature Factorization: :class:`DeepFeatureFactorization` and :func:`dff`, at
pytorch-grad-cam's module path."""

from fastxai.compat.feature_factorization.deep_feature_factorization import (
    DeepFeatureFactorization,
    dff,
)

__all__ = ["DeepFeatureFactorization", "dff"]
