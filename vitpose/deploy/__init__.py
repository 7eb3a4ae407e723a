"""After training: the model store, top-down inference, serving, ONNX export, int8 and ONNX Runtime."""
