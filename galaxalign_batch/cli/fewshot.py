"""`galaxalign-batch fewshot`: few-shot heads on frozen embeddings."""

from galaxalign_batch.cli._placeholder import placeholder


def register(sub) -> None:
    placeholder(sub, "fewshot", "few-shot heads on frozen embeddings", "large-vision-model framework issue")
