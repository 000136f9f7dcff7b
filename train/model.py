"""The cell classifier and its training-only augmentation."""

from __future__ import annotations

import logging

import keras
import tensorflow as tf
from keras import layers

logger = logging.getLogger(__name__)


@keras.saving.register_keras_serializable(package="malaria_detect")
class CellColourNorm(layers.Layer):
    """Grey-world colour constancy per cell: each channel divided by its mean over the cell's own pixels
    (the non-black ones), times 0.5. A slide's stain and light scale every channel of its cells alike; this
    takes that scale out and keeps the contrast of a parasite against its cell. Part of the model (it runs on
    the device inside the int8 graph), not of the shared preprocessing."""

    def call(self, x):
        # 1 / cell mean = share of the square the cell covers / mean of the square, written without a division:
        # int8 DIV fails on ai_edge_litert (a divisor at its zero point) and tflite_runtime 2.14 has none; RSQRT
        # runs on both (1/a = rsqrt(a)^2).
        mask = keras.ops.cast(keras.ops.max(x, axis=-1, keepdims=True) > 0.0, x.dtype)
        square_mean = keras.ops.mean(x * mask, axis=(1, 2), keepdims=True)
        share = keras.ops.mean(mask, axis=(1, 2), keepdims=True)
        # floored at 0.1 so that int8 calibration, whose range image is one white pixel on black, does not stretch
        # 1/mean over a range that leaves real cells a few steps. The floor is on the square's mean (cell mean x
        # share): NIH cells go down to about 0.17, but the red channel of some blue BBBC041 cells lies below 0.1,
        # and for those the step is not grey world (a dimmer channel stays dimmer). convert now keeps this layer's
        # operations in float (convert.core.float_nodes), where the stretch does not arise; the floor stays, as the
        # trained models have it.
        r = keras.ops.rsqrt(keras.ops.maximum(square_mean, 0.1))
        return x * (0.5 * share * r * r)


def build_model(size_px: int = 64, width: int = 16, dropout: float = 0.3, colour_norm: bool = False) -> keras.Model:
    """A compact CNN: uint8 RGB in, one logit out (p_infected = sigmoid(logit)).

    Normalisation is the first layer, so the exported model eats raw pixels. A logit output (not a
    sigmoid) keeps thresholds near 0.99 resolvable after uint8 quantisation of the output.
    Each stage is conv-BN-ReLU then 2x2 max-pool; BN folds into the conv on conversion.
    """
    inputs = keras.Input((size_px, size_px, 3), dtype="float32", name="cell_rgb")
    x = layers.Rescaling(1.0 / 255.0, name="normalise")(inputs)
    if colour_norm:
        x = CellColourNorm(name="cell_colour_norm")(x)
    for i, mult in enumerate((1, 2, 4, 8)):
        x = layers.Conv2D(width * mult, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = layers.Conv2D(width * 8, 3, padding="same", use_bias=False, name="conv4")(x)
    x = layers.BatchNormalization(name="bn4")(x)
    x = layers.ReLU(name="relu4")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(1, name="logit")(x)
    return keras.Model(inputs, outputs, name=f"cellnet{size_px}w{width}")


def geometric_augmenter(seed: int) -> keras.Sequential:
    """Rotations, shifts, reflections, zoom and shear; the background fill stays black."""
    return keras.Sequential(
        [
            layers.RandomFlip("horizontal_and_vertical", seed=seed),
            layers.RandomRotation(0.5, fill_mode="constant", fill_value=0.0, seed=seed + 1),
            layers.RandomTranslation(0.1, 0.1, fill_mode="constant", fill_value=0.0, seed=seed + 2),
            layers.RandomZoom((-0.15, 0.15), fill_mode="constant", fill_value=0.0, seed=seed + 3),
            layers.RandomShear(x_factor=0.1, y_factor=0.1, fill_mode="constant", fill_value=0.0, seed=seed + 4),
        ],
        name="augment_geometry",
    )


def stain_jitter(images: tf.Tensor, strength: float = 1.0) -> tf.Tensor:
    """Colour/stain jitter on a float batch in [0, 255]: hue, saturation, brightness, contrast and
    per-channel gains (smears from other labs are stained differently; BBBC041 fields are blue).

    Applied inside the cell only: the black background stays black, as on NIH crops and device crops.
    """
    mask = tf.cast(tf.reduce_max(images, axis=-1, keepdims=True) > 0.0, images.dtype)
    x = tf.clip_by_value(images / 255.0, 0.0, 1.0)
    n = tf.shape(x)[0]
    # Every draw is per image: tf.image.random_hue/saturation would shift a whole batch alike, which
    # batch normalisation then partly cancels during training but not at inference.
    hsv = tf.image.rgb_to_hsv(x)
    h, s, v = tf.unstack(hsv, axis=-1)
    dh = tf.random.uniform((n, 1, 1), -0.08 * strength, 0.08 * strength)
    ds = tf.random.uniform((n, 1, 1), 1 - 0.4 * strength, 1 + 0.4 * strength)
    x = tf.image.hsv_to_rgb(tf.stack([tf.math.floormod(h + dh, 1.0), tf.clip_by_value(s * ds, 0.0, 1.0), v], -1))
    gains = tf.random.uniform((n, 1, 1, 3), 1 - 0.15 * strength, 1 + 0.15 * strength)
    brightness = tf.random.uniform((n, 1, 1, 1), 1 - 0.2 * strength, 1 + 0.2 * strength)
    x = x * gains * brightness
    # Contrast around the mean of the cell (not of the black-padded square).
    area = tf.reduce_sum(mask, axis=[1, 2, 3], keepdims=True) + 1.0
    mean = tf.reduce_sum(x * mask, axis=[1, 2], keepdims=True) / area
    contrast = tf.random.uniform((n, 1, 1, 1), 1 - 0.25 * strength, 1 + 0.25 * strength)
    x = (x - mean) * contrast + mean
    x = tf.clip_by_value(x, 0.0, 1.0) * mask
    return x * 255.0


class WeightAverage(keras.callbacks.Callback):
    """Stochastic weight averaging: the final model is the mean of the weights (BN statistics included)
    at the end of every epoch from ``start_epoch`` (0-based) on, so no epoch is picked on held-out data."""

    def __init__(self, start_epoch: int):
        super().__init__()
        self.start_epoch = start_epoch
        self.sums: list | None = None
        self.n = 0

    def _float_weights(self) -> list:
        return [w for w in self.model.weights if "float" in str(w.dtype)]

    def on_epoch_end(self, epoch, logs=None):
        if epoch < self.start_epoch:
            return
        values = [w.numpy() for w in self._float_weights()]
        self.sums = values if self.sums is None else [a + b for a, b in zip(self.sums, values, strict=True)]
        self.n += 1

    def on_train_end(self, logs=None):
        if self.n:
            for w, total in zip(self._float_weights(), self.sums, strict=True):
                w.assign(total / self.n)
            logger.info("model = mean of the weights after each of the last %d epochs", self.n)
