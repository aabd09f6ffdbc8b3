"""Fused loss per CPU instruction-set level against MKL sgemm, in process CPU time (one thread):
    GALAXALIGN_CPU_ISA=v3 python bench/isa_levels.py; GALAXALIGN_CPU_ISA=v4 python bench/isa_levels.py
"""
import time, torch, torch.nn.functional as F
from galaxalign_batch import _core
from galaxalign_batch.ops import trimodal_contrastive_loss as L
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
f = [F.normalize(torch.randn(2048, 512, generator=g), dim=1).requires_grad_() for _ in range(3)]
s = torch.tensor(14.0)
best = 1e9
for _ in range(4):
    for x in f: x.grad = None
    c0 = time.process_time(); l = L(*f, s, impl="fused"); l.backward(); best = min(best, time.process_time() - c0)
a = torch.randn(1024, 1024); b = torch.randn(1024, 1024); a @ b
mm = 1e9
for _ in range(5):
    c0 = time.process_time(); a @ b; a @ b; mm = min(mm, (time.process_time() - c0) / 2)
flops = 12 * 2 * 2048**2 * 512
print(f"{_core.similarity_isa():28s} fused loss B=2048 CPU {best:.3f} s = {flops/best/1e9:.1f} GFLOP/s; sgemm 1 thread {2*1024**3/mm/1e9:.1f} GFLOP/s; fraction {flops/best/(2*1024**3/mm):.2f}")
