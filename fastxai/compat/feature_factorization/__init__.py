"""Deep Feature Factorization: :class:`DeepFeatureFactorization`, :func:`dff` and
:func:`run_dff_on_image`, at pytorch-grad-cam's module path."""

from fastxai.compat.feature_factorization.deep_feature_factorization import (
    DeepFeatureFactorization,
    dff,
    run_dff_on_image,
)

__all__ = ["DeepFeatureFactorization", "dff", "run_dff_on_image"]
