"""Distillation (ViTPose paper §3.4): knowledge tokens (``tokens``), the teacher-output view bank
(``bank``), the student and its loss (``student``), the sweep's search space (``space``), the one-time
preparation and the Tune sweep around it (``sweep``) and one trial (``trial``).

Import from the submodules: ``from vitpose.distill.sweep import run_sweep``.
"""
