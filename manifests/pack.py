#!/usr/bin/env python3
"""Thin CLI; the logic and the documentation live in eat_fairseq/prep/pack.py (run with --help)."""
from eat_fairseq.prep.pack import main

raise SystemExit(main())
