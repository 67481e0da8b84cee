"""End-to-end learning: the debug transformer learns caption → token pattern with the real losses.

Real parts throughout: the tiny open_clip text tower (random init) gives the context, the `debug`
VQDiffusionTransformer is trained with MaskAndReplace.losses + ImportanceSampler (plain AdamW),
and samples come from `generate.generate`. Trained once per preset, reused by both assertions.
"""
import pytest
import torch

from vqd_scale.config import DiscreteDiffusionConfig, SamplerConfig, TextEncoderConfig, TransformerConfig
from vqd_scale.diffusion.discrete import ImportanceSampler, MaskAndReplace
from vqd_scale.generate import generate
from vqd_scale.models.text import FrozenCLIPTextEncoder
from vqd_scale.models.transformer import VQDiffusionTransformer

pytestmark = pytest.mark.slow

K, SIDE, T = 16, 4, 100  # 16 codes, 4×4 tokens
CAPTIONS = ["a red square", "a blue circle", "two green dogs", "a yellow boat at sea",
            "an old brown house", "three white birds", "a purple mountain", "one black cat sleeping"]
STEPS, BATCH, LR = 400, 64, 3e-3


@pytest.fixture(scope="module")
def text_encoder():
    return FrozenCLIPTextEncoder(TextEncoderConfig(model="tiny"))


@pytest.fixture(scope="module", params=["released", "paper"])
def trained(request, text_encoder):
    """(model, diffusion, patterns, text tokens) after training on the caption → pattern task."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    patterns = torch.randint(0, K, (len(CAPTIONS), SIDE * SIDE), generator=g)  # caption i ↦ pattern i
    tokens = text_encoder.tokenize(CAPTIONS)
    context = text_encoder(tokens)  # [C, 77, width], frozen
    model = VQDiffusionTransformer(TransformerConfig(size="debug", num_classes=K, height=SIDE, width=SIDE,
                                                     context_dim=text_encoder.width, num_timesteps=T))
    dcfg = DiscreteDiffusionConfig(preset=request.param, num_timesteps=T)
    diffusion, importance = MaskAndReplace(dcfg, K), ImportanceSampler(T, dcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.96), weight_decay=4.5e-2)
    model.train()
    for _ in range(STEPS):
        c = torch.randint(0, len(CAPTIONS), (BATCH,), generator=g)
        x0 = patterns[c]
        t, weight = importance.sample(BATCH, generator=g)
        x_t = diffusion.q_sample(x0, t, g)
        drop = torch.rand(BATCH, generator=g) < dcfg.caption_dropout  # learn the null context for CFG
        ctx = torch.where(drop.view(-1, 1, 1), model.null_context.expand(BATCH, -1, -1), context[c])
        out = diffusion.losses(model(x_t, t, ctx), x0, x_t, t)
        opt.zero_grad()
        (out["loss"] * weight).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        importance.update(t, out["vlb"].detach())  # single process: the batch is the "gathered" batch
    assert importance.ready(), "importance sampling never left the uniform phase"
    return model.eval(), diffusion, patterns, tokens


def accuracy(trained, text_encoder, steps):
    model, diffusion, patterns, tokens = trained
    reps = 4
    cfg = SamplerConfig(steps=steps, batch_size=len(CAPTIONS) * reps)
    out = generate(model, text_encoder, diffusion, tokens.repeat(reps, 1), cfg, torch.Generator().manual_seed(1))
    target = patterns.repeat(reps, 1)
    # best caption-blind guess: the most frequent code at each position over the patterns
    blind = (patterns == patterns.mode(0).values).float().mean().item()
    return (out == target).float().mean().item(), blind


def test_learns_caption_to_pattern(trained, text_encoder):
    acc, blind = accuracy(trained, text_encoder, T)
    assert acc > 0.9, f"per-token accuracy {acc:.3f} at {T} steps; chance 1/K = {1 / K:.3f}, caption-blind {blind:.3f}"
    print(f"\n{T}-step accuracy {acc:.3f} (chance {1 / K:.3f}, caption-blind best {blind:.3f})")


def test_skip_step_keeps_most_of_it(trained, text_encoder):
    acc, blind = accuracy(trained, text_encoder, 25)
    assert acc >= 0.8, f"per-token accuracy {acc:.3f} at 25 of {T} steps; chance {1 / K:.3f}, caption-blind {blind:.3f}"
    print(f"\n25-step accuracy {acc:.3f} (chance {1 / K:.3f}, caption-blind best {blind:.3f})")
