"""pytorch-grad-cam's ``utils`` package, as far as fastxai provides it: the target classes in
:mod:`~fastxai.compat.utils.model_targets`, the image helpers in
:mod:`~fastxai.compat.utils.image` and the token/pyramid reshapes in
:mod:`~fastxai.compat.utils.reshape_transforms`."""
