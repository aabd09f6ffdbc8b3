"""The precision a model's forward passes run in: one rule for every command that has ``--precision``.

``fp32`` runs the model as stored. ``bf16`` runs its forward passes under torch's bf16 autocast (matrix
products and convolutions in bfloat16 with float32 accumulation; weights, normalisations and what the
caller is given stay float32). ``auto`` picks ``bf16`` where the hardware runs it natively and ``fp32``
elsewhere:

- a CUDA device: bf16 where ``torch.cuda.is_bf16_supported()`` (Ampere and later), else fp32;
- a CPU: bf16 where it has AVX512-BF16 (the same test as the bf16 loss kernels, :func:`cpu_bf16_kernels`,
  so ``GALAXALIGN_CPU_BF16=0`` keeps fp32 everywhere), else fp32: a CPU without it would emulate bf16,
  slower than fp32.

``bf16`` asked for by name on a CPU without AVX512-BF16 runs, emulated, with a warning (once per process):
measured on an AMD EPYC (Zen 3, AVX2 only), 1 thread, batch 64, the tiny config's image tower ran 6.8x
slower in bf16 than in fp32 (39 against 267 images/s), and torch's bf16 ``mm`` 2048^3 at 0.3 GFLOP/s
against fp32's 90 per core.

Measured on an AMD EPYC (Zen 4, AVX512-BF16), 1 thread, batch 64: the tiny config's image tower 1.66x and
the demo's trained checkpoint 1.45x faster in bf16, the demo model's rows within cosine 0.9997 of fp32
(docs/engine.md, "Precision").
"""

from __future__ import annotations

import contextlib
import logging

from galaxalign_batch.errors import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
CHOICES = ("auto", *PRECISIONS)


def resolve_precision(precision: str, device="cpu") -> str:
    """``"auto"`` -> ``"bf16"`` where bf16 autocast is native on ``device`` (see the module), else ``"fp32"``;
    ``"fp32"`` / ``"bf16"`` as given; anything else is a :class:`ConfigError`."""
    if precision != "auto":
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {precision!r} (auto or one of {', '.join(PRECISIONS)})")
        if precision == "bf16":
            _warn_if_emulated(device)
        return precision
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if dev.type != "cpu":
        return "fp32"
    from galaxalign_batch.ops.backends import cpu_bf16_kernels

    return "bf16" if cpu_bf16_kernels() else "fp32"


_warned_emulated = False


def _warn_if_emulated(device) -> None:
    """Warn (once) when bf16 is asked for on a CPU that would emulate it."""
    global _warned_emulated
    import torch

    if _warned_emulated or torch.device(device).type != "cpu":
        return
    from galaxalign_batch.ops.backends import cpu_has_native_bf16, module_for

    if module_for(torch.device("cpu")) is None or cpu_has_native_bf16():  # no _core: cannot tell, say nothing
        return
    _warned_emulated = True
    log.warning("--precision bf16 on a CPU without AVX512-BF16: bf16 is emulated here, several times slower than "
                "fp32 (the tiny image tower 6.8x on an AMD EPYC Zen 3); --precision auto runs fp32 on this CPU")


def autocast(precision: str, device="cpu"):
    """A context manager running the forward passes inside it in ``precision`` (resolved: fp32 or bf16) on
    ``device``'s type; fp32 is a no-op."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r} (one of {', '.join(PRECISIONS)})")
    if precision == "fp32":
        return contextlib.nullcontext()
    import torch

    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
