"""Small Keras models for the demo and the tests: the seed's recipe at toy size."""

from __future__ import annotations

import keras
from keras import layers


def small_resnet(input_shape=(32, 32, 3), classes: int = 10, momentum: float = 0.99, width: int = 16) -> keras.Model:
    """Stem conv + BN, two residual blocks (stride 2), global pooling, softmax head.

    Raw 0..255 inputs go straight in, as in the seed. Compiled as the seed: Adam,
    sparse categorical cross-entropy, accuracy.
    """

    def bn():
        return layers.BatchNormalization(momentum=momentum)

    inp = keras.Input(input_shape)
    x = layers.ReLU()(bn()(layers.Conv2D(width, 3, padding="same", use_bias=False)(inp)))
    for filters in (2 * width, 4 * width):
        y = layers.ReLU()(bn()(layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False)(x)))
        y = bn()(layers.Conv2D(filters, 3, padding="same", use_bias=False)(y))
        s = bn()(layers.Conv2D(filters, 1, strides=2, use_bias=False)(x))
        x = layers.ReLU()(layers.Add()([y, s]))
    out = layers.Dense(classes, activation="softmax")(layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out, name="small_resnet")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model
