"""Training-engine pieces without a process group: env detection, LR in samples, DeepSpeed config,
EMA maths, checkpoint selection/retention, model-size refusal, signals, config refusal by the CLI."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

from vqd_scale.config import DeepSpeedConfig, OptimConfig
from vqd_scale.train import checkpoint as C
from vqd_scale.distributed import DEFAULT_PORT, detect_env, slurm_job_port
from vqd_scale.train.ema import EMA
from vqd_scale.train.engine import ds_config, param_groups, resolve_precision
from vqd_scale.train.lr_schedule import lr_at
from vqd_scale.train.signals import StopFlag

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")


def test_env_torchrun_slurm_and_single():
    assert detect_env({}).world_size == 1 and detect_env({}).launcher == "single"
    tr = detect_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"})
    assert (tr.rank, tr.local_rank, tr.world_size, tr.master_addr, tr.master_port) == (3, 1, 4, "h0", 1234)
    # srun: no torchrun variables; a plain single-host nodelist needs no scontrol.
    sl = detect_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                     "SLURM_JOB_NODELIST": "gpu-a17", "SLURM_JOB_ID": "123"})
    assert (sl.rank, sl.local_rank, sl.world_size, sl.master_addr, sl.launcher) == (5, 1, 8, "gpu-a17", "slurm")
    assert sl.master_port == 20000 + 123
    for job in (0, 11999, 12000, 987654):  # below the ephemeral ports, and what slurm/common.sh exports
        port = detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": str(job)}).master_port
        assert 20000 <= port < 32768 and port == slurm_job_port(job)
        sh = subprocess.run(["bash", "-c", f"source {REPO}/slurm/common.sh; SLURM_JOB_ID={job} MASTER_ADDR=h "
                             "vqd_rendezvous; echo $MASTER_PORT"], capture_output=True, text=True, check=True,
                            env={k: v for k, v in os.environ.items() if k != "MASTER_PORT"})
        assert int(sh.stdout) == port, (job, sh.stdout, sh.stderr)
    # torchrun inside srun: torchrun's variables describe the worker processes.
    both = detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "RANK": "1", "WORLD_SIZE": "2"})
    assert (both.rank, both.world_size, both.launcher) == (1, 2, "torchrun")
    with pytest.raises(ValueError, match="outside world size"):
        detect_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_plain_process_honours_master_port_else_takes_a_free_one():
    given = detect_env({"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "12345"})
    assert (given.launcher, given.world_size, given.master_addr, given.master_port) == ("single", 1, "10.1.2.3", 12345)
    with socket.socket() as held:
        try:  # hold the old fixed default; if someone else holds it, it is just as taken
            held.bind(("127.0.0.1", DEFAULT_PORT))
            held.listen()
        except OSError:
            pass
        picked = detect_env({}).master_port
        assert picked != DEFAULT_PORT
        with socket.socket() as s:
            s.bind(("127.0.0.1", picked))  # free: a rendezvous can listen there
    for bad, needle in (("abc", "not an integer"), ("70000", "not a TCP port")):
        with pytest.raises(ValueError, match=needle):
            detect_env({"MASTER_PORT": bad})


def test_lr_depends_on_samples_only():
    cfg = OptimConfig(lr=1e-3, warmup_samples=1000, decay="cosine", min_lr_ratio=0.1)
    assert lr_at(0, cfg, 10_000) < 2e-6  # warm-up starts near 0
    assert lr_at(999, cfg, 10_000) == pytest.approx(1e-3)
    assert lr_at(1000, cfg, 10_000) == pytest.approx(1e-3)
    assert lr_at(5500, cfg, 10_000) == pytest.approx(0.55e-3)  # cosine midpoint: floor + half the range
    assert lr_at(10_000, cfg, 10_000) == pytest.approx(1e-4) == lr_at(50_000, cfg, 10_000)
    lin = OptimConfig(lr=1e-3, warmup_samples=0, decay="linear", min_lr_ratio=0.0)
    assert lr_at(2500, lin, 10_000) == pytest.approx(0.75e-3)
    # 8 GPUs × 4 samples after 100 steps = 2 GPUs × 4 samples after 400 steps: same lr.
    assert lr_at(8 * 4 * 100, cfg, 10_000) == lr_at(2 * 4 * 400, cfg, 10_000)


def test_ds_config_and_param_groups():
    conf = ds_config(DeepSpeedConfig(zero_stage=3, grad_accum=4), OptimConfig(grad_clip=0.5), micro_batch=8,
                     world_size=2, precision="fp32")
    assert conf["zero_optimization"]["stage"] == 3 and conf["gradient_clipping"] == 0.5
    assert conf["zero_optimization"]["reduce_bucket_size"] == DeepSpeedConfig().bucket_elements
    assert conf["train_batch_size"] == 8 * 4 * 2 and conf["gradient_accumulation_steps"] == 4
    assert not conf["bf16"]["enabled"]
    assert resolve_precision(DeepSpeedConfig(precision="auto"), torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve_precision(DeepSpeedConfig(precision="fp16"), torch.device("cpu"))
    with pytest.raises(ValueError, match="zero_stage >= 1"):
        ds_config(DeepSpeedConfig(zero_stage=0, offload_optimizer=True), OptimConfig(), 1, 1, "fp32")
    m = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    decay, no_decay = param_groups(m, 0.05)
    assert decay["weight_decay"] == 0.05 and [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0  # emb, bias, LN w+b


def test_ema_matches_formula_and_schedule():
    torch.manual_seed(0)
    m = nn.Linear(3, 2)
    ema = EMA(decay=0.9, every=2, keep=True)
    ema.init_from(m)
    w0 = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    assert not ema.maybe_update(m, step=1)  # only every 2nd step
    assert torch.equal(ema.state_dict()["weight"], w0)
    assert ema.maybe_update(m, step=2)
    torch.testing.assert_close(ema.state_dict()["weight"], 0.9 * w0 + 0.1 * (w0 + 1.0))
    other = EMA(0.9, 2, keep=False)  # non-zero ranks hold nothing
    other.init_from(m)
    with pytest.raises(RuntimeError, match="rank 0"):
        other.state_dict()
    with pytest.raises(ValueError, match="shape"):
        ema.load_state_dict({"weight": torch.zeros(5, 5), "bias": torch.zeros(2)}, torch.device("cpu"))


def _fake_ckpt(run, step, complete=True):
    d = run / C.CKPT_DIR / C.ckpt_name(step)
    d.mkdir(parents=True)
    (d / "shard.pt").write_bytes(b"x")
    if complete:
        (d / C.COMPLETE).write_text(json.dumps({"step": step}))
    return d


def test_list_resume_prune(tmp_path):
    assert C.list_complete(tmp_path) == [] and C.resolve_resume(tmp_path, "auto") is None
    for s in (10, 20, 30, 40):
        _fake_ckpt(tmp_path, s)
    _fake_ckpt(tmp_path, 25, complete=False)
    _fake_ckpt(tmp_path, 50, complete=False)  # newest, but interrupted mid-save
    assert [s for s, _ in C.list_complete(tmp_path)] == [10, 20, 30, 40]
    assert C.resolve_resume(tmp_path, "auto").name == "step_00000040"
    assert C.resolve_resume(tmp_path, "none") is None
    with pytest.raises(FileNotFoundError, match="incomplete"):
        C.resolve_resume(tmp_path, str(tmp_path / "checkpoints" / "step_00000050"))
    C.prune(tmp_path, keep_last=2, milestone_every=20)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # keep 30, 40 (last 2) + 20, 40 (milestones); 25 is a dead incomplete save; 50 may still be finishing.
    assert left == ["step_00000020", "step_00000030", "step_00000040", "step_00000050"]


def test_other_model_size_refused():
    m = {"size": "debug", "layers": None, "num_classes": 64, "activation_checkpointing": False}
    C.check_same_model({"model": m}, {"model": dict(m, activation_checkpointing=True)}, "ck")  # memory switch only
    with pytest.raises(ValueError, match=r"model.size: checkpoint 'debug' vs config 'S'"):
        C.check_same_model({"model": m}, {"model": dict(m, size="S")}, "ck")
    with pytest.raises(ValueError, match=r"model.num_classes: checkpoint 64 vs config 128"):
        C.check_same_model({"model": m}, {"model": dict(m, num_classes=128)}, "ck")


def test_stop_flag_catches_preemption_signals():
    flag = StopFlag().install()
    try:
        assert not flag.raised
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flag.raised and flag.signum == signal.SIGUSR2
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal is kept; no exit from inside the handler
        assert flag.signum == signal.SIGUSR2
    finally:
        flag.restore()


@pytest.mark.parametrize("override,needle", [
    ("optim.lr=-1", "optim.lr"),
    ("optim.bogus=1", "bogus"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("logging.every_steps=0", "logging.every_steps"),  # was accepted, then a ZeroDivisionError on every rank
    ("checkpoint.every_minutes=0", "checkpoint.every_minutes"),
])
def test_cli_refuses_bad_values(override, needle, tmp_path, capsys):
    from vqd_scale.cli.train import main
    assert main([TINY, override, f"run_dir={tmp_path}/run"]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_refuses_bad_config_before_process_group(tmp_path):
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    # WORLD_SIZE=2 with nobody else: if a process group were started this would hang (timeout fails it).
    r = subprocess.run([sys.executable, "-m", "vqd_scale.cli.train", TINY, "deepspeed.zero_stage=5",
                        f"run_dir={tmp_path}/run"], capture_output=True, text=True, timeout=60,
                       cwd=REPO, env=env)
    assert r.returncode == 2 and "deepspeed.zero_stage" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def _data_case(tmp_path, case):
    """Overrides for a run whose data/precision can be refused from files alone, and the expected message."""
    from vqd_scale.data.random_shards import write_random_token_shards
    d = tmp_path / "data"
    write_random_token_shards(d, 2, 4, (4, 4), 32, tokenizer_id="vqgan-aaaaaaaaaaaa")
    src = [f'data.sources=[{{name: r, shards: "{d}/{{00000..00001}}.tar"}}]', "model.num_classes=32",
           "model.height=4", "model.width=4"]
    if case == "no shards match":
        return [f'data.sources=[{{name: r, shards: "{d}/nope_{{00000..00001}}.tar"}}]', "model.num_classes=32"], \
            "none of the shards"
    if case == "manifest of another tokenizer":
        m = json.loads((d / "manifest.json").read_text())
        (d / "manifest.json").write_text(json.dumps({**m, "tokenizer_id": "vqgan-bbbbbbbbbbbb"}))
        return src, "was extracted with tokenizer_id='vqgan-aaaaaaaaaaaa'"
    return src + ["deepspeed.precision=bf16"], "deepspeed.precision=bf16 needs a GPU"


@pytest.mark.parametrize("case", ["no shards match", "manifest of another tokenizer"])
def test_data_and_precision_refused_before_process_group(tmp_path, case):
    """These were raised only after the process group and the engine had started (rank 1 of 2 is missing
    here: a process group would hang, and the timeout would fail the test)."""
    overrides, needle = _data_case(tmp_path, case)
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1", DS_ACCELERATOR="cpu")
    r = subprocess.run([sys.executable, "-m", "vqd_scale.cli.train", TINY, *overrides, f"run_dir={tmp_path}/run",
                        "logging.wandb_mode=disabled"], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_unwritable_run_dir_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    overrides, _ = _data_case(tmp_path, "bf16 on CPU")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    r = subprocess.run([sys.executable, "-m", "vqd_scale.cli.train", TINY, *overrides[:-1],
                        f"run_dir={tmp_path}/file/run", "logging.wandb_mode=disabled"], capture_output=True, text=True,
                       timeout=300, cwd=REPO, env=dict(env, DS_ACCELERATOR="cpu", WANDB_MODE="disabled"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"run_dir {tmp_path}/file/run cannot be written (Not a directory" in r.stderr, r.stderr[-2000:]


def _wandb_run(monkeypatch, tmp_path, fail_init=None):
    """A rank-0 MetricsLogger on a real offline wandb run (or a failing init), in tmp_path."""
    import wandb
    from vqd_scale.config import LoggingConfig
    from vqd_scale.train.metrics import MetricsLogger
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    if fail_init is not None:
        monkeypatch.setattr(wandb, "init", fail_init)
    return MetricsLogger(LoggingConfig(wandb_mode="online"), tmp_path / "run", True, {"a": 1}, 0)


def test_wandb_init_failure_warns_and_keeps_jsonl(monkeypatch, tmp_path):
    from vqd_scale.train.metrics import read_metrics

    def down(**kw):
        raise ConnectionError("api.wandb.ai unreachable")
    with pytest.warns(RuntimeWarning, match="wandb failed to start.*ConnectionError.*metrics.jsonl") as rec:
        logger = _wandb_run(monkeypatch, tmp_path, fail_init=down)
    assert logger.wandb is None and len(rec) == 1
    logger.log(1, {"loss": 2.5})
    logger.log(2, {"loss": 1.5})
    logger.close()
    m = read_metrics(tmp_path / "run")
    assert sorted(m) == [1, 2] and m[2]["loss"] == 1.5


def test_wandb_log_failure_warns_once_and_keeps_jsonl(monkeypatch, tmp_path):
    from vqd_scale.train.metrics import read_metrics
    logger = _wandb_run(monkeypatch, tmp_path)
    assert logger.wandb is not None and logger.wandb.settings.mode == "offline"  # WANDB_MODE beat the config
    calls = []

    def lost(*a, **kw):  # what a run whose wandb-core service was SIGTERMed raises
        calls.append(a)
        raise ConnectionResetError("Connection lost")
    run = logger.wandb
    monkeypatch.setattr(run, "log", lost)
    with pytest.warns(RuntimeWarning, match="wandb failed to log.*ConnectionResetError") as rec:
        for step in (1, 2, 3):
            logger.log(step, {"loss": float(step)})
    assert len(rec) == 1 and len(calls) == 1  # warned once, then wandb is left alone
    logger.close()  # finishes the real run and shuts wandb's service down: nothing left open
    assert sorted(read_metrics(tmp_path / "run")) == [1, 2, 3]


def test_wandb_mode_env_overrides_config(monkeypatch, tmp_path):
    import wandb
    from vqd_scale.config import LoggingConfig
    from vqd_scale.train.metrics import MetricsLogger
    seen = []
    monkeypatch.setattr(wandb, "init", lambda **kw: seen.append(kw["mode"]) or None)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    MetricsLogger(LoggingConfig(wandb_mode="online"), tmp_path / "a", True, {}, 0).close()
    monkeypatch.setenv("WANDB_MODE", "offline")
    MetricsLogger(LoggingConfig(wandb_mode="disabled"), tmp_path / "b", True, {}, 0).close()
    assert seen == ["offline"]


def test_signal_during_wandb_init_or_finish_does_not_kill(monkeypatch, tmp_path):
    """A preemption signal during init reaches the previous handler afterwards; during finish it is held."""
    outer = StopFlag().install()  # stands for the training loop's handler
    try:
        def slow_init(**kw):
            os.kill(os.getpid(), signal.SIGUSR2)
            raise TimeoutError("init timed out")
        with pytest.warns(RuntimeWarning, match="failed to start"), monkeypatch.context() as mp:
            _wandb_run(mp, tmp_path, fail_init=slow_init).close()
        assert outer.signum == signal.SIGUSR2  # re-delivered after init, not lost
        outer.signum = None
        logger = _wandb_run(monkeypatch, tmp_path)
        run = logger.wandb

        def finish_then_term():
            os.kill(os.getpid(), signal.SIGTERM)
            raise ConnectionResetError("Connection lost")
        monkeypatch.setattr(run, "finish", finish_then_term)
        with pytest.warns(RuntimeWarning) as rec:
            logger.close()
        msgs = " ".join(str(w.message) for w in rec)
        assert "failed to finish" in msgs and f"signal {int(signal.SIGTERM)} arrived while wandb was finishing" in msgs
        assert outer.signum is None  # held by close(), not delivered to (or killing) the process
        assert signal.getsignal(signal.SIGTERM) == outer._handler  # handlers restored
    finally:
        outer.restore()
