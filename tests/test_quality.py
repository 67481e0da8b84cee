"""Training quality end to end: the demo's recipe at its budget must give a model that visibly works.

This is the test that would have caught the loss-scale bug: every function agreed with its oracle,
yet the model a user trained learned far worse than the official code, because the loss was T = 100×
smaller than the official one and the copied `grad_clip: 0.5` never engaged. Here the real pipeline
of `tools/demo.py` (synthetic img2dataset shards → k-means tokenizer → vqd-extract →
`vqd-train configs/tiny.yaml` + the demo recipe, DeepSpeed on CPU) trains for the demo's 80k samples
(tests/quality_run.py starts it in the background when the session collects this file), then one
sample per held-out caption is scored by the synthetic attribute classifier.

Measured with this recipe and data at 80k samples, 96 held-out captions (the test's) unless noted:
    this code (commit 29a0c9f)                         all attributes 0.94 (seed 1: 0.99), clipped steps 0.97
    old loss scale (1/(T·p_t), clip inert; 6ddcad4)    all attributes 0.01 (colour 0.29), clipped steps 0.00
    this code with optim.grad_clip=0 (bench/quality)   all attributes 0.06 (256 captions)
A shorter budget cannot tell them apart: this code scores 0.01 at 24k, 40k and 48k (constant lr)
samples, as does the old one; accuracy takes off only after ~60k samples. Hence the full budget, run
beside the rest of the suite.
"""
import json

import pytest
import quality_run

pytestmark = pytest.mark.slow
HELDOUT = 96
BAR_ALL = 0.8  # all three attributes right (this code: see above; the old recipe fails it by far)


@pytest.fixture(scope="module")
def trained():
    """The demo's data and a run of the demo recipe at its budget (started at collection)."""
    return quality_run.wait(timeout=1500)


@pytest.mark.timeout(1600)
def test_demo_recipe_learns_the_captions(trained):
    import sys
    sys.path.insert(0, str(quality_run.REPO / "tools"))
    import demo

    from vqd_scale.config import SamplerConfig
    from vqd_scale.eval.quality import sample_accuracy, synthetic_heldout
    from vqd_scale.models.vqvae import ImageTokenizer

    _, model, text, diffusion, _ = demo.load_run(trained / "run")
    held = synthetic_heldout(HELDOUT, demo.RES)
    res = sample_accuracy(model, text, diffusion, ImageTokenizer.load(trained / "tokenizer"), held,
                          SamplerConfig(**demo.SAMPLER))
    got, chance = res["samples"], res["chance"]
    print(f"\nall attributes {got['all']:.2f} (colour {got['color']:.2f}, shape {got['shape']:.2f}, position "
          f"{got['position']:.2f}, count {got['count']:.2f}); chance {chance['all']:.2f}")
    assert got["all"] >= BAR_ALL, (got, chance)


@pytest.mark.timeout(1600)
def test_the_official_clip_engages(trained):
    """With the official loss scale, grad_clip 0.5 clips (almost) every step, as in the official recipe."""
    lines = (trained / "run" / "metrics.jsonl").read_text().splitlines()
    fracs = [json.loads(ln)["clip_frac"] for ln in lines if ln.strip()]
    assert sum(fracs) / len(fracs) > 0.8, fracs
