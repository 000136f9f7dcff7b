"""Training of the cell classifier (TensorFlow/Keras; never imported on the device)."""
