"""The embedded default's person detector: a small torchvision FCOS trained from random weights on the synthetic
dataset's person boxes (``pipelines/detector.py``), exported to ONNX in the ``torchvision`` layout of
``vitpose.deploy.detector`` and registered in MLflow, so predict and serving find people in bare synthetic images
and videos. Real footage takes a real detector's ONNX file (YOLOX, RTMDet, ultralytics) instead."""
