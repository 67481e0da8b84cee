"""Thin wrapper around `vqd-extract` (same arguments): python tools/extract_tokens.py --help."""
import sys

from vqd_scale.cli.extract import main

if __name__ == "__main__":
    sys.exit(main())
