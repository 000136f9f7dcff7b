"""The cell classifier and its training-only augmentation."""

from __future__ import annotations

import logging

import keras
import numpy as np
import tensorflow as tf
from keras import layers

logger = logging.getLogger(__name__)


def build_model(size_px: int = 64, width: int = 16, dropout: float = 0.3) -> keras.Model:
    """A compact CNN: uint8 RGB in, one logit out (p_infected = sigmoid(logit)).

    Normalisation is the first layer, so the exported model eats raw pixels. A logit output (not a
    sigmoid) keeps thresholds near 0.99 resolvable after uint8 quantisation of the output.
    Each stage is conv-BN-ReLU then 2x2 max-pool; BN folds into the conv on conversion.
    """
    inputs = keras.Input((size_px, size_px, 3), dtype="float32", name="cell_rgb")
    x = layers.Rescaling(1.0 / 255.0, name="normalise")(inputs)
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


class FlipConv2D(layers.Layer):
    """3x3 'same' convolution that commutes with an upside-down flip of the image (a Z2 group convolution).

    Channels come in two halves, ``[a, b]``: flipping the input upside down flips every map and swaps
    the halves. ``lift=True`` is the first layer (plain RGB in): each free filter ``k`` yields ``k`` and
    its flipped copy. Otherwise each output pair is ``a' = Wa*a + Wb*b`` and ``b' = F(Wb)*a + F(Wa)*b``
    (``F``: flip of the kernel rows). The kernel is built from half as many free weights as a plain
    conv of the same shape, and :func:`plain_model` writes it out as one.
    """

    def __init__(self, filters: int, lift: bool = False, **kwargs):
        super().__init__(**kwargs)
        if filters % 2:
            raise ValueError(f"filters must be even (pairs of flipped maps), got {filters}")
        self.filters, self.lift = filters, lift

    def build(self, input_shape):
        c_in, half = int(input_shape[-1]), self.filters // 2
        init = keras.initializers.HeNormal(seed=None)
        if self.lift:
            self.wa = self.add_weight(shape=(3, 3, c_in, half), initializer=init, name="wa")
        else:
            self.wa = self.add_weight(shape=(3, 3, c_in // 2, half), initializer=init, name="wa")
            self.wb = self.add_weight(shape=(3, 3, c_in // 2, half), initializer=init, name="wb")

    def full_kernel(self):
        flip = lambda k: tf.reverse(k, axis=[0])  # noqa: E731 - rows of the kernel
        if self.lift:
            return tf.concat([self.wa, flip(self.wa)], axis=3)
        ka = tf.concat([self.wa, self.wb], axis=2)
        kb = tf.concat([flip(self.wb), flip(self.wa)], axis=2)
        return tf.concat([ka, kb], axis=3)

    def call(self, x):
        return tf.nn.conv2d(x, self.full_kernel(), strides=1, padding="SAME")

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "lift": self.lift}


class PairedBatchNorm(layers.Layer):
    """Batch normalisation with one set of statistics and parameters per flipped pair of channels."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = layers.BatchNormalization(axis=-1, name="bn")

    def build(self, input_shape):
        self.half = int(input_shape[-1]) // 2
        self.bn.build((None, None, None, 2, self.half))

    def call(self, x, training=None):
        s = tf.shape(x)
        y = self.bn(tf.reshape(x, [s[0], s[1], s[2], 2, self.half]), training=training)
        return tf.reshape(y, s)


def build_flip_model(size_px: int = 48, width: int = 8, dropout: float = 0.3) -> keras.Model:
    """The :func:`build_model` network made exactly invariant to an upside-down flip of the cell.

    Every conv is a :class:`FlipConv2D` with paired batch normalisation; max-pooling keeps the symmetry
    while the map sides are even, and the two halves are averaged before the logit. For training only:
    :func:`plain_model` turns it into the ordinary graph (same layers, same cost per cell) that is saved.
    """
    if size_px % 16:
        raise ValueError(f"the flip-invariant model needs a side divisible by 16, got {size_px}")
    inputs = keras.Input((size_px, size_px, 3), dtype="float32", name="cell_rgb")
    x = layers.Rescaling(1.0 / 255.0, name="normalise")(inputs)
    for i, mult in enumerate((1, 2, 4, 8)):
        x = FlipConv2D(width * mult, lift=(i == 0), name=f"conv{i}")(x)
        x = PairedBatchNorm(name=f"bn{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = FlipConv2D(width * 8, name="conv4")(x)
    x = PairedBatchNorm(name="bn4")(x)
    x = layers.ReLU(name="relu4")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Reshape((2, width * 4), name="pairs")(x)
    x = layers.GlobalAveragePooling1D(name="pair_mean")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(1, name="logit")(x)
    return keras.Model(inputs, outputs, name=f"cellnet{size_px}w{width}flip")


def plain_model(flip: keras.Model, size_px: int, width: int) -> keras.Model:
    """The :func:`build_model` graph computing exactly what a :func:`build_flip_model` network computes."""
    plain = build_model(size_px, width)
    for i in range(5):
        plain.get_layer(f"conv{i}").set_weights([flip.get_layer(f"conv{i}").full_kernel().numpy()])
        pbn = flip.get_layer(f"bn{i}").bn
        plain.get_layer(f"bn{i}").set_weights([np.tile(w, 2) for w in pbn.get_weights()])
    w, b = flip.get_layer("logit").get_weights()
    plain.get_layer("logit").set_weights([np.concatenate([w, w]) / 2.0, b])
    return plain


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
