"""Transfer-learning training, ONNX export and registration for the image and text models."""
