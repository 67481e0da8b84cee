"""Thin wrapper: `python tools/export_diffusers.py ...` = `vqd-export ...`."""
import sys

from vqd_scale.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
