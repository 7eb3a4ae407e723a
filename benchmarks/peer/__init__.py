"""The parts of ``python -m benchmarks.compare_peer``, by section: ``common`` (configs, constants),
``model`` (1: the peer built from our spec, same function), ``speed`` (2-3 and 6: interleaved speed, MFU,
profiles), ``shipped`` (2b: the shipped DeepSpeed step), ``accuracy`` (4: bf16 AP), ``loader`` (5: data loader
vs pre-made tensors) and ``report`` (targets and the markdown report)."""
