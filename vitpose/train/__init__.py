"""Training: the loop (``loop``), where it reports and resumes (``session``), the checkpoint folder format
(``checkpoint``), the bad-sample count (``bad_samples``) and the Ray Train entry point (``worker``).

Import from the submodules: ``from vitpose.train.loop import Trainer``.
"""
