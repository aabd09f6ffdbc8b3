"""Short recipe experiments behind issue 13's diagnosis (docs/model.md "The demo's recipe").

    python bench/galaxalign_recipes.py --data SIM 'JSON list of runs'

Each run trains the image-text objective (class-aware InfoNCE, galaxalign_batch.ops) of a
galaxalign-tiny model for ``steps`` steps at batch ``bsz`` (1 torch thread) and prints, at the
``evals`` steps, (step, val accuracy through text prototypes, mean pairwise cosine of the val
embeddings, last loss). Keys of a run: name, steps, bsz, lr, wd, scale (initial logit scale),
vision_extra (open_clip vision_cfg overrides, e.g. {"pool_type": "avg"}), init (a checkpoint to start
from), layers ("all" | "proj" | "last:N"), chain (true: continue the previous run's model), evals.
"""
import copy
import json
import math
import time

import numpy as np
import torch

torch.set_num_threads(1)
import open_clip  # noqa: E402
from galaxalign_batch.model.train import TrainConfig, build_model, _Prompts, augment_images, _param_groups, _schedule
from galaxalign_batch.model.data import load_dataset
from galaxalign_batch.model.config import model_config
from galaxalign_batch.model.galaxalign import GalaxAlignModel
from galaxalign_batch.preprocess import CutoutSpec
from galaxalign_batch.ops import trimodal_contrastive_loss
from galaxalign_batch.model.evaluate import quick_accuracy

import argparse
_a = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
_a.add_argument("--data", required=True)
_a.add_argument("runs")
ARGS = _a.parse_args()
cfg0 = TrainConfig(data=ARGS.data, out="unused", mode="image-text")
base = build_model(cfg0)
spec = CutoutSpec.from_dict(base.info["cutout_spec"])
d = load_dataset(ARGS.data, base.vocabulary, spec=spec)
tr, va = d.split("train"), d.split("val")

def make(vision_extra=None, seed=0, init=None):
    torch.manual_seed(seed)
    if init:
        from galaxalign_batch.model import load_checkpoint
        b = load_checkpoint(init)
        return GalaxAlignModel(b.clip, copy.deepcopy(base.info), base.tokenizer, base.vocabulary, base.symbols)
    cfg = model_config("galaxalign-tiny")
    cfg["vision_cfg"].update(vision_extra or {})
    clip = open_clip.CLIP(**cfg)
    m = GalaxAlignModel(clip, copy.deepcopy(base.info), base.tokenizer, base.vocabulary, base.symbols)
    return m

def run(name, steps=104, bsz=32, lr=1e-3, vision_extra=None, wd=0.1, scale=None, seed=0, init=None, layers='all', model=None, evals=(52, 104, 156, 208, 312)):
    m = model if model is not None else make(vision_extra, seed, init)
    if scale: 
        with torch.no_grad(): m.clip.logit_scale.fill_(math.log(scale))
    m.set_trainable(layers)
    opt = torch.optim.AdamW(_param_groups(m, wd), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    sch = _schedule(opt, steps, 0.05)
    prompts = _Prompts(m)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter(); out = []
    step = 0
    while step < steps:
        order = rng.permutation(len(tr))
        for i in range(0, len(order) - bsz + 1, bsz):
            idx = order[i:i+bsz]; lab = tr.labels[idx]
            m.train()
            x = m.prepare_images(augment_images(tr.batch(idx), rng))
            tok, inv = prompts.sample(lab, rng)
            o = m(images=x, tokens=tok)
            loss = trimodal_contrastive_loss(o["image"], o["text"][inv], None, m.logit_scale, class_ids=torch.from_numpy(lab), weights=(1,0,0))
            opt.zero_grad(); loss.backward(); opt.step(); sch.step(); m.clamp_logit_scale()
            step += 1
            if step in evals or step == steps:
                f = m.encode_images(va.images)
                acc = quick_accuracy(m, va.images, va.labels).get("text")
                cos = (f @ f.T).mean().item()
                out.append((step, round(acc, 3), round(cos, 3), round(loss.item(), 3)))
            if step >= steps: break
    print(name, f"{time.perf_counter()-t0:.0f}s", out, flush=True)
    return m

exps = json.loads(ARGS.runs)
m = None
for e in exps:
    chain = e.pop("chain", False)
    m = run(**e, model=m if chain else None)
