"""`galaxalign-batch train`: fine-tune a GalaxAlign model (stage 1 and 2) or a baseline."""

from galaxalign_batch.cli._placeholder import placeholder


def register(sub) -> None:
    placeholder(sub, "train", "fine-tune a GalaxAlign model (stage 1 and 2) or a baseline", "GalaxAlign issue")
