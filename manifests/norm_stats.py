#!/usr/bin/env python3
"""Thin CLI; the logic and the documentation live in eat_fairseq/prep/norm_stats.py (run with --help)."""
from eat_fairseq.prep.norm_stats import main

raise SystemExit(main())
