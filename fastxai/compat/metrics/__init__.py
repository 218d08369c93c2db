"""pytorch-grad-cam's ``metrics`` package: the same modules, classes, calls and numbers.

``from fastxai.compat.metrics.road import ROADCombined`` replaces
``from pytorch_grad_cam.metrics.road import ROADCombined``; every metric is called as
``metric(input_tensor, grayscale_cams, targets, model)`` and returns float32 scores ``(N,)``.
Modules: :mod:`~fastxai.compat.metrics.cam_mult_image`,
:mod:`~fastxai.compat.metrics.perturbation_confidence`, :mod:`~fastxai.compat.metrics.road`
and :mod:`~fastxai.compat.metrics.arcc`.

Differences, all deliberate:

- ROAD's linear imputation is solved by conjugate gradients in torch (no SciPy), on the input's
  device, for all images of a call at once; the noise is still drawn on the CPU in
  pytorch-grad-cam's order, so a seed gives the same numbers;
- the model's buffers are left as they were (a model in training mode normalises with batch
  statistics, as in pytorch-grad-cam, but its running statistics are not updated);
- one target for a batch applies to every image (pytorch-grad-cam scores only the first image);
  any other length mismatch is an error;
- ``DropInConfidence`` and ``IncreaseInConfidence`` also accept ``return_visualization=True``;
- Otsu's threshold (``percentile="auto"``) is computed without OpenCV; where two levels split the
  histogram equally well (an exact tie), OpenCV may pick the other one.
"""
