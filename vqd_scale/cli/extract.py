"""vqd-extract: img2dataset shards → token shards (+ done-markers, manifest.json). See docs/data-format.md."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from vqd_scale.data.extract import ExtractConfig, run_extract
from vqd_scale.errors import UserError


def parse(argv=None) -> tuple[ExtractConfig, argparse.Namespace]:
    """Command line → ExtractConfig (+ flags that only steer the CLI)."""
    d = ExtractConfig()
    ap = argparse.ArgumentParser(prog="vqd-extract", description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", required=True, help="braceexpand pattern, e.g. 'laion/{00000..01023}.tar'")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--tokenizer", required=True, help="tokenizer directory (tools/fit_tokenizer.py output or a VQModel dir)")
    ap.add_argument("--source", default=d.source,
                    help="dataset name stored per sample (laion, cc15m, …); default: the inputs' folder name")
    ap.add_argument("--resolution", type=int, default=d.resolution,
                    help="image side in pixels; default: the resolution the tokenizer was prepared for")
    ap.add_argument("--min-image-size", type=int, default=d.min_size,
                    help="skip (and count as too_small) images whose original shorter side is below this")
    ap.add_argument("--no-center-crop", action="store_true", help="squash to a square instead of centre-cropping")
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--num-workers", type=int, default=d.num_workers, help="image-decoding DataLoader workers")
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--text-tokenizer", default=d.text_tokenizer)
    ap.add_argument("--clip-model", default=None, help="open_clip model for image/text embeddings ('tiny' or a name)")
    ap.add_argument("--clip-pretrained", default=None, help="local weights for --clip-model (never a hub tag)")
    ap.add_argument("--keep-uncaptioned", action="store_true",
                    help="keep images without a caption as image-only records (the decoder family trains on "
                         "them; counted as 'uncaptioned' in the done-markers and manifest); default: skipped "
                         "as missing_caption")
    ap.add_argument("--task-index", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)))
    ap.add_argument("--num-tasks", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)))
    ap.add_argument("--fail-on-invalid-shard", action="store_true",
                    help="exit with status 2 when a shard had no valid sample, was unreadable or truncated")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    cfg = ExtractConfig(inputs=a.inputs, out_dir=a.out_dir, tokenizer=a.tokenizer, source=a.source,
                        resolution=a.resolution, center_crop=not a.no_center_crop, min_size=a.min_image_size,
                        batch_size=a.batch_size,
                        num_workers=a.num_workers, device=a.device, text_tokenizer=a.text_tokenizer,
                        clip_model=a.clip_model, clip_pretrained=a.clip_pretrained, task_index=a.task_index,
                        keep_uncaptioned=a.keep_uncaptioned,
                        num_tasks=a.num_tasks, progress=not a.no_progress)
    return cfg, a


def main(argv=None) -> int:
    """Run one extraction task; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg, a = parse(argv)
    embedder = None
    if cfg.clip_model:
        from vqd_scale.data.embed import ClipEmbedder

        embedder = ClipEmbedder.build(cfg.clip_model, cfg.clip_pretrained, cfg.device, cfg.out_dir)
    try:
        m = run_extract(cfg, embedder)
    except UserError as e:  # a wrong flag, not a crash: say what to fix, no traceback
        logging.error("vqd-extract: %s", e)
        return 2
    print(f"manifest: {m['totals']} shards={len(m['shards'])} failed={m['num_failed_shards']} "
          f"truncated={len(m['truncated_shards'])} missing={len(m['missing_inputs'])} "
          f"pending={len(m['pending_inputs'])} source={m['source']} resolution={m['resolution']} "
          f"tokenizer={m['tokenizer_id']}")
    if m["totals"].get("uncaptioned"):
        print(f"image-only records (no caption, kept by --keep-uncaptioned): {m['totals']['uncaptioned']} of "
              f"{m['totals']['written']} written; caption-reading families skip them, the decoder trains on them")
    if m["num_failed_shards"]:
        logging.error("%d shard(s) had no valid sample: %s", m["num_failed_shards"], m["failed_shards"])
    if m["truncated_shards"]:
        logging.error("%d input shard(s) are truncated (samples after the cut are lost; %s known lost): %s — "
                      "download them again; a rerun redoes replaced inputs", len(m["truncated_shards"]),
                      m["totals"].get("lost_samples", 0), m["truncated_shards"])
    if a.fail_on_invalid_shard and (m["num_failed_shards"] or m["truncated_shards"]):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
