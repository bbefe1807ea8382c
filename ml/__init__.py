"""Training and evaluation of the screening model (TensorFlow is imported lazily)."""
