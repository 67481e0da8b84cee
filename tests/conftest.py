"""Shared test setup: CPU DeepSpeed environment, offline hubs, quiet wandb."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vqd_scale/torch_extensions"))


def pytest_collection_finish(session):
    """Start the learning test's training run now, so it runs beside the rest of the suite."""
    if any(item.nodeid.startswith("tests/test_quality.py") for item in session.items):
        import quality_run
        quality_run.start()


def pytest_sessionfinish(session, exitstatus):
    import sys
    if "quality_run" in sys.modules:
        sys.modules["quality_run"].stop()
