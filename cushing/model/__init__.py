"""From a cohort to a trained model: the one backbone registry, devices, on-device augmentation, the engine
(the paper's protocol, built for speed), checkpoints, training and scoring, and Grad-CAM.

Owns: `backbones`, `devices`, `augment`, `engine`, `checkpoint`, `train`, `explain`. May import `cushing.data`,
`cushing.stats` and `cushing.config`; never mlflow (values in, values out; the only files written are
checkpoints and caches). timm and torch are imported here; pytorch_grad_cam only in `explain`.
"""
