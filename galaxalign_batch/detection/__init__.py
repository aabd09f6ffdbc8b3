"""Source detection learned on the foundation model (issue 16): a CenterNet-style head on the frozen
GalaxAlign encoder's patch tokens, the Faster R-CNN (ResNet-50-FPN, random weights) baseline trained
on the same simulated fields, box metrics, and the ``detect`` command's tile -> catalogue path.

- ``fields``: training / evaluation fields cut from simulated bricks, truth boxes (:func:`cut_fields`).
- ``head``: :class:`DetectionHead` (its encoder: ``model.tokens.load_token_encoder``); ``rcnn``: :class:`RCNNDetector`.
- ``train``: :func:`train_detector` (one budget rule for both); ``files``: :func:`save_detector`,
  :func:`load_detector`.
- ``metrics`` (IoU matching, P / R / F1, AP at IoU 0.5), ``evaluate`` (box and position metrics on
  held-out fields, the sep baseline on the same fields).
- ``apply``: :func:`detect_tile`, :func:`detect_tiles` (windows, NMS, FITS catalogue).

See docs/detection.md.
"""

from galaxalign_batch.detection.apply import detect_tile, detect_tiles
from galaxalign_batch.detection.fields import FieldSet, cut_fields, truth_boxes
from galaxalign_batch.detection.files import load_detector, read_detector_info, save_detector
from galaxalign_batch.detection.head import DetectionHead, DetectorConfig
from galaxalign_batch.detection.metrics import average_precision, box_iou, evaluate_boxes, match_boxes
from galaxalign_batch.detection.rcnn import RCNNConfig, RCNNDetector
from galaxalign_batch.detection.train import DetectTrainSettings, train_detector

__all__ = ["DetectTrainSettings", "DetectionHead", "DetectorConfig", "FieldSet", "RCNNConfig", "RCNNDetector",
           "average_precision", "box_iou", "cut_fields", "detect_tile", "detect_tiles", "evaluate_boxes",
           "load_detector", "match_boxes", "read_detector_info", "save_detector", "train_detector",
           "truth_boxes"]
