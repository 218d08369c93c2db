"""pytorch-grad-cam compatible classes: switch by changing the import.

``from fastxai.compat import GradCAM`` takes the constructor and call of pytorch-grad-cam 1.5.7
(``GradCAM(model, target_layers, reshape_transform=None)(input_tensor, targets, aug_smooth,
eigen_smooth)``) and returns the same float32 numpy array ``(N, H, W)`` in [0, 1].

Classes: ``GradCAM``, ``GradCAMPlusPlus``, ``XGradCAM``, ``LayerCAM``, ``HiResCAM``,
``GradCAMElementWise``, ``ShapleyCAM``, ``EigenCAM``, ``EigenGradCAM``, ``SegEigenCAM``,
``KPCA_CAM``, ``FEM``, ``RandomCAM``, ``ScoreCAM``, ``AblationCAM``, ``FinerCAM``, ``FullGrad``,
``GuidedBackpropReLUModel`` and ``BaseCAM`` (whose constructor takes ``compute_input_gradient``,
``uses_gradients``, ``tta_transforms`` and ``detach``, and whose subclasses may override
``get_cam_weights`` or ``get_cam_image``, as in pytorch-grad-cam); the meta-methods
``RefineCAM`` (the product of one CAM per layer) and ``SESS`` (CAMs of sliding windows over
several scales, fused), each around any of these classes; ``DeepFeatureFactorization`` and
``run_dff_on_image``, importable from here as from pytorch-grad-cam. Helpers:
:mod:`fastxai.compat.utils.model_targets`, :mod:`fastxai.compat.utils.image` and
:mod:`fastxai.compat.utils.reshape_transforms`; metrics: :mod:`fastxai.compat.metrics`; deep
feature factorisation: :mod:`fastxai.compat.feature_factorization` (``DeepFeatureFactorization``,
``dff`` and ``run_dff_on_image``, scikit-learn's NMF computed in float64 without scikit-learn;
``show_factorization_on_image`` and ``create_labels_legend`` in
:mod:`fastxai.compat.utils.image`, without OpenCV). Not provided: ``ActivationsAndGradients``
(fastxai puts no hooks on the model), ``sobel_cam`` (OpenCV) and ``ablation_cam_multilayer``;
``utils.svd_on_activations`` and ``utils.find_layers`` are there.
``AblationCAM`` takes ``ratio_channels_to_ablate`` (pytorch-grad-cam's channel selection),
``reshape_transform`` (token outputs: each channel is zeroed at every token) and the ablation
layers of :mod:`fastxai.compat.ablation_layer` or pytorch-grad-cam, read by class name
(``AblationLayerFasterRCNN``: a detector's feature pyramid, as in pytorch-grad-cam's Faster
R-CNN tutorial).

Differences, all deliberate:

- the model is never changed: no hooks, no ``.grad``, no layer swapping, and its mode stays as
  it is: a model in training mode is explained in eval mode, as pytorch-grad-cam explains it
  (which calls ``model.eval()`` on it for good), and each module's mode is given back after the
  call, also when it raises;
- one target for a batch applies to every image (pytorch-grad-cam explains only the first image
  and returns zero maps for the rest); any other length mismatch is an error;
- activations are captured faithfully where pytorch-grad-cam reads a tensor that a later in-place
  ReLU overwrote (e.g. vgg16 ``features[28]``, resnet ``layer1[0].bn1``): there the two differ;
- Ablation-CAM sets the ablated channel to 0 (the paper), also where the layer can be negative
  (pytorch-grad-cam uses min - 1e7 there, e.g. at a ViT's LayerNorm), and re-runs only the
  network after the layer where it can run on its own (else the whole model, with the layer's
  output replaced by a temporary forward hook; with ``AblationLayerFasterRCNN`` it sets the
  channel to -1000 and re-runs the whole detector, as pytorch-grad-cam does);
  ``ratio_channels_to_ablate`` above
  0.5 ablates every channel (pytorch-grad-cam 1.5.7 ablates the overlap of its two halves twice
  and then weighs no channel after the first one ablated twice);
- Eigen-CAM, Eigen-Grad-CAM and ``eigen_smooth`` fix the arbitrary SVD sign (largest-magnitude
  value positive; KPCA-CAM's scikit-learn reference fixes it the same way); the keyword
  ``svd_sign="numpy"`` of every class takes pytorch-grad-cam's sign instead (that of NumPy's
  float32 SVD), which gives its maps;
- KPCA-CAM computes the kernel PCA in float64 with torch (no scikit-learn), so it is closer to
  the exact result than pytorch-grad-cam's float32 one; kernels: sigmoid, rbf, poly, linear,
  cosine;
- Shapley-CAM applies ``reshape_transform`` to the activations too (pytorch-grad-cam weighs the
  untransformed ones, which fails for token outputs);
- FullGrad reads the biases when called (pytorch-grad-cam when constructed) and sums each
  layer's channels before upsampling (bilinear resizing is linear, so only rounding differs);
- ``GuidedBackpropReLUModel`` guides the ReLUs through forward hooks removed after the call
  (pytorch-grad-cam swaps them for modules and leaves non-in-place ``nn.ReLU`` behind), never
  moves the model (a ``device`` other than the model's is an error) and refuses a
  ``target_category`` that is not a class index;
- ``show_factorization_on_image`` leaves ``explanations`` and matplotlib's settings as they are
  (pytorch-grad-cam zeroes each map in place and sets ``legend.fontsize`` globally), takes its
  default colours from ``matplotlib.colormaps`` (pytorch-grad-cam's ``matplotlib.cm.get_cmap``
  is gone from matplotlib 3.9) and converts HSV to RGB as OpenCV 5's vectorised code does,
  truncating: OpenCV's scalar code, which it uses for the last (width mod 32) pixels of each
  row, rounds there, one level higher at most; ``run_dff_on_image``'s ``reshape_transform``
  defaults to ``None`` (pytorch-grad-cam's default is a typing object that fails when called);
- ``RefineCAM`` passes ``eigen_smooth`` to each layer's CAM as ``eigen_smooth``
  (pytorch-grad-cam passes it in the place of ``aug_smooth``, so there it augments instead);
  ``SESS`` runs the model in eval mode for its window scores too, and gives the modes back;
- ``compute_input_gradient`` and ``detach`` are accepted; the first changes nothing (no method
  needs the input's gradient), the second only decides whether the subclass hooks receive
  NumPy arrays or tensors.
"""

from fastxai.compat._base import BaseCAM
from fastxai.compat.cams import (
    FEM,
    KPCA_CAM,
    AblationCAM,
    EigenCAM,
    EigenGradCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    RandomCAM,
    ScoreCAM,
    SegEigenCAM,
    ShapleyCAM,
    XGradCAM,
)
from fastxai.compat.feature_factorization import DeepFeatureFactorization, run_dff_on_image
from fastxai.compat.finer_cam import FinerCAM
from fastxai.compat.fullgrad import FullGrad
from fastxai.compat.guided_backprop import GuidedBackpropReLUModel
from fastxai.compat.refine_cam import RefineCAM
from fastxai.compat.sess import SESS

__all__ = [
    "FEM",
    "KPCA_CAM",
    "SESS",
    "AblationCAM",
    "BaseCAM",
    "DeepFeatureFactorization",
    "EigenCAM",
    "EigenGradCAM",
    "FinerCAM",
    "FullGrad",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "GuidedBackpropReLUModel",
    "HiResCAM",
    "LayerCAM",
    "RandomCAM",
    "RefineCAM",
    "ScoreCAM",
    "SegEigenCAM",
    "ShapleyCAM",
    "XGradCAM",
    "run_dff_on_image",
]
