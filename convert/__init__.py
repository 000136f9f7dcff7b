"""Conversion of the Keras cell classifier to int8 TensorFlow Lite, with its model card."""
