"""Running graphs on onnxruntime: the clean pass and noisy evaluation of work units."""
