"""The baseline: torchvision Faster R-CNN with a ResNet-50-FPN backbone from random weights (nothing is
downloaded: ``weights=None, weights_backbone=None``), trained on the same fields as the head.

It sees the same normalised fields as the detection head (``fields.normalise``; ``image_mean`` 0,
``image_std`` 1, and ``min_size = max_size`` = the field side, so torchvision does not resize).
Two settings differ from torchvision's COCO defaults, both to fit a 128-px field on a CPU budget:
anchors of 8, 16, 32, 64, 128 px (one size per FPN level, aspect ratios 0.5, 1, 2) instead of
32-512 px (a star's truth box is ~10 px, a large galaxy's ~60 px), and fewer sampled anchors / RoIs
per image (64 / 64 instead of 256 / 512) with fewer RPN proposals (500 / 200 in training, 300 / 100
in inference): the box head's RoIs are most of the step's cost on a CPU. With random backbone weights
torchvision trains every layer and uses ordinary BatchNorm (not frozen).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.survey.layout import PIXSCALE


@dataclass(frozen=True)
class RCNNConfig:
    field: int = 128
    anchor_sizes: tuple[int, ...] = (8, 16, 32, 64, 128)
    rpn_batch: int = 64
    roi_batch: int = 64
    compress: float = 4.0
    pixscale: float = PIXSCALE
    max_detections: int = 100

    def __post_init__(self):
        if len(self.anchor_sizes) != 5 or self.field < 16:
            raise ConfigError(f"bad Faster R-CNN configuration {dataclasses.asdict(self)}")
        object.__setattr__(self, "anchor_sizes", tuple(int(a) for a in self.anchor_sizes))


class RCNNDetector(nn.Module):
    """torchvision ``fasterrcnn_resnet50_fpn`` (2 classes: background, source) on normalised fields."""

    def __init__(self, config: RCNNConfig):
        super().__init__()
        from torchvision.models.detection import fasterrcnn_resnet50_fpn
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        self.config = config
        anchors = AnchorGenerator(tuple((a,) for a in config.anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
        self.net = fasterrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=2, min_size=config.field, max_size=config.field,
            image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0], rpn_anchor_generator=anchors,
            rpn_batch_size_per_image=config.rpn_batch, box_batch_size_per_image=config.roi_batch,
            rpn_pre_nms_top_n_train=500, rpn_post_nms_top_n_train=200, rpn_pre_nms_top_n_test=300,
            rpn_post_nms_top_n_test=100, box_detections_per_img=config.max_detections, box_score_thresh=0.01)

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        return self.net(images, targets)


def rcnn_targets(boxes: list[np.ndarray]) -> list[dict[str, torch.Tensor]]:
    """torchvision targets (label 1 for every box) of per-field truth boxes."""
    return [{"boxes": torch.as_tensor(np.asarray(b, np.float32).reshape(-1, 4)),
             "labels": torch.ones(len(np.asarray(b).reshape(-1, 4)), dtype=torch.int64)} for b in boxes]


@torch.no_grad()
def predict(model: RCNNDetector, images: np.ndarray, sigma: np.ndarray, *, batch_size: int = 16,
            min_score: float = 0.01) -> list[tuple[np.ndarray, np.ndarray]]:
    """Boxes and scores of fields ``images`` (N, 3, S, S) nanomaggies with noise ``sigma`` (N, 3)."""
    from galaxalign_batch.detection.fields import normalise

    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(normalise(images[i:i + batch_size], sigma[i:i + batch_size], model.config.compress))
        for r in model(list(x)):
            keep = r["scores"] >= min_score
            out.append((r["boxes"][keep].numpy().astype(np.float32), r["scores"][keep].numpy().astype(np.float32)))
    return out
