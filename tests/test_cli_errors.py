"""CLIs catch only UserError (a bad input, exit 2 with one line); any other exception is a bug and keeps its
traceback — a ValueError deep in a training run used to be swallowed into `vqd-train: error: ...`."""
import pytest

from vqd_scale.errors import ConfigError, MissingInput, UserError


def test_user_errors_are_value_errors_and_missing_inputs_file_not_found():
    assert issubclass(UserError, ValueError) and issubclass(ConfigError, UserError)
    assert issubclass(MissingInput, UserError) and issubclass(MissingInput, FileNotFoundError)


@pytest.mark.parametrize("raised,code", [(UserError("fix the thing"), 2), (ValueError("a bug"), None)])
def test_vqd_train_exits_2_on_user_errors_only(monkeypatch, capsys, raised, code):
    from vqd_scale.cli.train import main
    from vqd_scale.train import loop

    def run(*a, **k):
        raise raised
    monkeypatch.setattr(loop, "run", run)
    if code is None:
        with pytest.raises(ValueError, match="a bug"):
            main(["logging.wandb_mode=disabled"])
    else:
        assert main(["logging.wandb_mode=disabled"]) == code
        assert capsys.readouterr().err.strip() == "vqd-train: error: fix the thing"


@pytest.mark.parametrize("raised,code", [(UserError("fix the thing"), 2), (KeyError("a bug"), None)])
def test_vqd_export_exits_2_on_user_errors_only(monkeypatch, capsys, tmp_path, raised, code):
    from vqd_scale.cli import export

    def fail(a):
        raise raised
    monkeypatch.setattr(export, "_import", fail)
    argv = ["import", str(tmp_path / "src"), "--out", str(tmp_path / "w.safetensors")]
    if code is None:
        with pytest.raises(KeyError):
            export.main(argv)
    else:
        assert export.main(argv) == code and "fix the thing" in capsys.readouterr().err


def test_vqd_eval_bad_config_is_one_line_but_a_bug_is_not(monkeypatch, capsys, tmp_path):
    from vqd_scale.cli.eval import main
    from vqd_scale.config import save_config
    from vqd_scale.families import RunConfig

    run = tmp_path / "run"
    run.mkdir()
    save_config(RunConfig(), run / "config.yaml")
    assert main([str(run), "--once", "optim.lr=-1"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    from vqd_scale.eval import watch

    def boom(*a, **k):
        raise ValueError("a bug in the watcher")
    monkeypatch.setattr(watch, "run", boom)
    with pytest.raises(ValueError, match="a bug in the watcher"):
        main([str(run), "--once"])


def test_vqd_train_lists_every_registered_family(capsys):
    from vqd_scale.cli import train
    from vqd_scale.families import FAMILIES
    assert train.main(["--families"]) == 0
    out = capsys.readouterr().out
    for fam in FAMILIES.values():
        assert f"{fam.name}: {fam.summary}" in out and all(v in out for v in fam.notes.values())
