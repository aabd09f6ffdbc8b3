"""`galaxalign-batch label`: human-in-the-loop labelling in the browser."""

from galaxalign_batch.cli._placeholder import placeholder


def register(sub) -> None:
    placeholder(sub, "label", "human-in-the-loop labelling in the browser", "large-vision-model framework issue")
