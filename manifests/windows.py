#!/usr/bin/env python3
"""Thin CLI; the logic and the documentation live in eat_fairseq/prep/windows.py (run with --help)."""
from eat_fairseq.prep.windows import main

raise SystemExit(main())
