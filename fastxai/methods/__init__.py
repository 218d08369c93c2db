"""The CAM family: each module says only how its method weighs the layer's channels."""

from fastxai.methods.ablation_cam import ablationcam
from fastxai.methods.class_activation import cam
from fastxai.methods.eigen_cam import eigencam
from fastxai.methods.eigen_grad_cam import eigengradcam
from fastxai.methods.fem import fem
from fastxai.methods.grad_cam import gradcam
from fastxai.methods.grad_cam_elementwise import gradcamelementwise
from fastxai.methods.grad_cam_pp import gradcampp
from fastxai.methods.hires_cam import hirescam
from fastxai.methods.kpca_cam import kpcacam
from fastxai.methods.layer_cam import layercam
from fastxai.methods.random_cam import randomcam
from fastxai.methods.score_cam import scorecam
from fastxai.methods.seg_eigen_cam import segeigencam
from fastxai.methods.shapley_cam import shapleycam
from fastxai.methods.xgrad_cam import xgradcam

METHODS = {
    "cam": cam,
    "gradcam": gradcam,
    "gradcampp": gradcampp,
    "xgradcam": xgradcam,
    "layercam": layercam,
    "hirescam": hirescam,
    "gradcamelementwise": gradcamelementwise,
    "shapleycam": shapleycam,
    "eigencam": eigencam,
    "eigengradcam": eigengradcam,
    "segeigencam": segeigencam,
    "kpcacam": kpcacam,
    "fem": fem,
    "randomcam": randomcam,
    "ablationcam": ablationcam,
    "scorecam": scorecam,
}

__all__ = [
    "METHODS",
    "ablationcam",
    "cam",
    "eigencam",
    "eigengradcam",
    "fem",
    "gradcam",
    "gradcamelementwise",
    "gradcampp",
    "hirescam",
    "kpcacam",
    "layercam",
    "randomcam",
    "scorecam",
    "segeigencam",
    "shapleycam",
    "xgradcam",
]
