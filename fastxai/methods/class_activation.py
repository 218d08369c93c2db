"""CAM (Zhou et al., 2016): class activation maps of global-pool + linear heads."""

from __future__ import annotations

from torch import Tensor, nn

from fastxai.capture import LayerCapture
from fastxai.methods._base import make_cam_method


def find_linear_head(model: nn.Module, in_features: int, fc: str | nn.Module | None) -> nn.Linear:
    """The classifier that reads the pooled layer: ``fc`` if given, else the last ``nn.Linear``
    with ``in_features`` inputs."""
    if isinstance(fc, str):
        fc = model.get_submodule(fc)
    if fc is None:
        heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
        heads = [m for m in heads if m.in_features == in_features]
        if not heads:
            raise ValueError(
                f"layer: CAM needs a linear head reading the layer's {in_features} channels "
                "after global pooling, and the model has none; pass fc= or use gradcam"
            )
        fc = heads[-1]
    if not isinstance(fc, nn.Linear) or fc.in_features != in_features:
        raise ValueError(f"fc must be an nn.Linear with {in_features} inputs, got {fc}")
    return fc


def cam_contributions(
    cap: LayerCapture, model: nn.Module, x: Tensor, fc: str | nn.Module | None = None
) -> tuple[Tensor, Tensor]:
    r""":math:`w_k = W_{c,k}` (the head's weight for class :math:`c`); contributions
    :math:`w_k A_k`."""
    if cap.targets.callables is not None:
        raise ValueError("targets: CAM explains class indices; callable targets need gradcam")
    head = find_linear_head(model, cap.activation.shape[1], fc)
    # The head's weight joins the graph only where the activation does (create_graph=True).
    weight = head.weight if cap.activation.requires_grad else head.weight.detach()
    weights = weight[cap.targets.classes].to(cap.activation.dtype)
    return weights[:, :, None, None] * cap.activation, weights


cam = make_cam_method(
    "cam",
    cam_contributions,
    with_gradient=False,
    summary=r"""CAM: :math:`M = \mathrm{ReLU}(\sum_k W_{c,k} A_k)` for a network whose head is
    global
    average pooling then a linear layer ``W`` (found automatically, or ``fc=`` a name or module),
    then min-max, bilinear upsampling, min-max. Equals Grad-CAM at that layer up to scale.""",
)
