"""vitpose-distill: ViTPose teachers trained with Ray Train + DeepSpeed, distilled into small students.

The library runs without Ray: models, datasets, losses and the evaluator are plain Python objects.
``pipelines/`` holds the thin Ray entry points.
"""

__version__ = "0.1.0"
