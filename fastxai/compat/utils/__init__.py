"""pytorch-grad-cam's ``utils`` package, as far as fastxai provides it: the target classes in
:mod:`fastxai.compat.utils.model_targets`."""
