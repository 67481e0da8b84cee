"""vqd-eval RUN_DIR [--once | --watch] [--step N [--force]] [key=value ...]

Evaluates every complete checkpoint of a run directory exactly once (eval/<step>.json, .png,
curves.png, wandb). `--watch` keeps polling (eval.poll_seconds) until training has finished (RUN_DIR/DONE
or a checkpoint at max_samples) and nothing is pending, or eval.idle_timeout passes without a new
checkpoint; started before its training job, it first waits for the run to appear (--wait-for-run).
Settings come from RUN_DIR/config.yaml; dotted overrides change them, e.g.
`eval.num_samples=1000 eval.sampler.steps=50`. Works as one process, under torchrun or srun (the
ranks split the samples).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vqd_scale.eval import watch
from vqd_scale.families import load_config
from vqd_scale.errors import UserError


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="vqd-eval", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="training run directory (holds config.yaml and checkpoints/)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="evaluate what is pending now, then exit (default)")
    mode.add_argument("--watch", action="store_true", help="keep evaluating new complete checkpoints")
    ap.add_argument("--step", type=int, default=None, help="evaluate only this checkpoint step")
    ap.add_argument("--force", action="store_true", help="with --step: re-evaluate even if a result exists")
    ap.add_argument("--config", default=None, help="config YAML instead of RUN_DIR/config.yaml")
    ap.add_argument("--wait-for-run", type=float, default=None, metavar="SECONDS",
                    help="with --watch: how long to wait for the run to appear (RUN_DIR/config.yaml and a "
                         "complete checkpoint), for a watcher started before its training job "
                         "(default: eval.idle_timeout of the defaults + overrides)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.num_samples=1000")
    a = ap.parse_intermixed_args(argv)  # overrides may come before or after the options
    if a.force and a.step is None:
        ap.error("--force needs --step N (results of other steps are kept)")
    if a.wait_for_run is not None and (not a.watch or a.wait_for_run < 0):
        ap.error("--wait-for-run SECONDS (>= 0) goes with --watch")
    return a


def _requested(result: dict) -> set[str]:
    """eval.metrics a stored result was computed for (older results: read off its metric names)."""
    if "requested_metrics" in result:
        return set(result["requested_metrics"])
    names = set(result.get("metrics", {})) | set(result.get("not_meaningful", {}))
    return {"attributes" if k.startswith("attr_") else k for k in names}


def force_hint(run_dir: Path, metrics: list[str], done: list[int]) -> str:
    """A line naming kept results computed for other eval.metrics than this run's ("" when none)."""
    import json

    other = []
    for p in sorted((run_dir / watch.EVAL_DIR).glob("*.json"), key=lambda q: (len(q.stem), q.stem)):
        if not p.stem.isdigit() or int(p.stem) in done:
            continue
        try:
            if _requested(json.loads(p.read_text())) != set(metrics):
                other.append(p.stem)
        except (OSError, ValueError):
            continue
    if not other:
        return ""
    return (f"vqd-eval: step(s) {', '.join(other)} already have results for other metrics than "
            f"eval.metrics={list(metrics)}; each checkpoint is evaluated once, so they are kept. To re-evaluate "
            f"one with these settings: vqd-eval {run_dir} --step {other[-1]} --force [overrides]")


def main(argv=None) -> int:
    a = parse_args(argv)
    run_dir = Path(a.run_dir)
    cfg_path = Path(a.config) if a.config else run_dir / "config.yaml"
    try:
        if a.watch and not watch.run_appeared(run_dir) and not _wait_for_run(run_dir, a):
            return 2
        if not cfg_path.is_file():
            print(f"vqd-eval: {cfg_path} not found; is {run_dir} a vqd-train run directory? (--watch waits "
                  "for a run that has not started yet)", file=sys.stderr)
            return 2
        cfg = load_config(cfg_path, a.overrides)
    except UserError as e:
        print(f"vqd-eval: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if a.step is not None and not a.watch:
        ckpt = run_dir / "checkpoints" / f"step_{a.step:08d}"
        if not (ckpt / "complete.json").is_file():
            print(f"vqd-eval: {ckpt} is not a complete checkpoint (missing, or its save was interrupted); "
                  "use --watch to wait for it", file=sys.stderr)
            return 2
    from vqd_scale.distributed import shutdown
    from vqd_scale.eval.job import EvalJob, setup_ranks

    ranks = setup_ranks()
    # --force: the old result is set aside, not deleted, and put back if this evaluation fails
    kept = watch.result_path(run_dir, a.step).with_suffix(".json.replaced") if a.force else None
    if kept and ranks.is_main and watch.result_path(run_dir, a.step).exists():
        watch.result_path(run_dir, a.step).replace(kept)
    ranks.decide(lambda: None)  # the old result is gone on every rank's view before anyone scans
    built: list[EvalJob] = []

    def evaluate(step, path):
        if not built:  # built at the first pending checkpoint: nothing to load when there is none
            built.append(EvalJob(cfg, run_dir, ranks))
        return built[0](step, path)
    try:
        done = watch.run(run_dir, evaluate, watch=a.watch, poll_seconds=cfg.eval.poll_seconds,
                         idle_timeout=cfg.eval.idle_timeout, stale_seconds=cfg.eval.lock_stale_seconds,
                         only_step=a.step, decide=ranks.decide, is_main=ranks.is_main)
    finally:
        for ev in built:
            ev.close()
        shutdown()
        if kept and ranks.is_main and kept.exists():
            if watch.result_path(run_dir, a.step).exists():
                kept.unlink()
            else:
                kept.replace(watch.result_path(run_dir, a.step))
    if ranks.is_main:
        print(f"vqd-eval: evaluated {len(done)} checkpoint(s): {done}", flush=True)
        hint = force_hint(run_dir, cfg.eval.metrics, list(done)) if not a.force else ""
        if hint:
            print(hint, flush=True)
    return 0


def _wait_for_run(run_dir: Path, a: argparse.Namespace) -> bool:
    """Wait (watch mode) for a training run that has not written its config and a first complete
    checkpoint yet; False, with a message, when it did not appear in time."""
    defaults = load_config(None, a.overrides).eval  # the run's own config does not exist yet
    timeout = defaults.idle_timeout if a.wait_for_run is None else a.wait_for_run
    print(f"vqd-eval: waiting up to {timeout:.0f} s for {run_dir} to appear (config.yaml and a complete "
          "checkpoint of a training run)", file=sys.stderr, flush=True)
    if watch.wait_for_run(run_dir, timeout, defaults.poll_seconds):
        return True
    print(f"vqd-eval: {run_dir} did not appear within {timeout:.0f} s (no config.yaml and complete checkpoint); "
          "is the training job running with this run_dir? --wait-for-run SECONDS waits longer", file=sys.stderr)
    return False


if __name__ == "__main__":
    sys.exit(main())
