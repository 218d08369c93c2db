"""pytorch-grad-cam's ``utils`` package: the target classes in
:mod:`~fastxai.compat.utils.model_targets`, the image helpers in
:mod:`~fastxai.compat.utils.image`, the token/pyramid reshapes in
:mod:`~fastxai.compat.utils.reshape_transforms`, the SVD projections in
:mod:`~fastxai.compat.utils.svd_on_activations` and the layer finders in
:mod:`~fastxai.compat.utils.find_layers`; ``deprocess_image`` and ``get_2d_projection`` are
importable from here, as from pytorch-grad-cam."""

from fastxai.compat.utils import model_targets, reshape_transforms
from fastxai.compat.utils.image import deprocess_image
from fastxai.compat.utils.svd_on_activations import get_2d_projection

__all__ = ["deprocess_image", "get_2d_projection", "model_targets", "reshape_transforms"]
