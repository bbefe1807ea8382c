"""A source-adversarial head with gradient reversal, conditioned on the label (recipe lever).

Source and label are nearly the same thing in this data (NIH holds only non-COVID films, most
COVID-19 films come from one collection), so an adversary that predicts the source from the
features alone would push the network to forget the label as well.  Instead there is one source
head per label: the COVID-19 head sees only COVID-19 films, the non-COVID head only non-COVID
films, so what the features are pushed to forget is *which source a film of a given label came
from* (Ganin et al. 2016's gradient reversal, conditioned as in Long et al. 2018's CDAN).

Invariant: the classifier trained here is the plain network of its architecture (the heads are
training-only), so it is saved, loaded and served exactly like any other; ``GradientReversal``
is the identity forward and negates (times ``scale``) the gradient backward.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf


class GradientReversal(keras.layers.Layer):
    """Identity forward; backward, the incoming gradient times ``-scale``."""

    def __init__(self, scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale = float(scale)

    def call(self, x: Any) -> Any:
        scale = self.scale

        @tf.custom_gradient
        def reverse(t: Any) -> Any:
            def grad(dy: Any) -> Any:
                return -scale * dy

            return tf.identity(t), grad

        return reverse(x)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "scale": self.scale}


class SourceAdversarial(keras.Model):
    """Wraps a Sequential classifier for training: the label loss on its output plus ``weight``
    times the label-conditioned source loss through a gradient reversal on its penultimate
    features.  Targets are packed as ``(n, 2)``: [label, source index]; ``call`` is the
    classifier's, so callbacks and early stopping see the classifier alone."""

    def __init__(self, classifier: Any, n_sources: int, weight: float, seed: int = 0) -> None:
        super().__init__(name="source_adversarial")
        self.classifier = classifier
        self.n_sources = n_sources
        self.weight = float(weight)
        self.reverse = GradientReversal(1.0)
        init = keras.initializers.GlorotUniform(seed=seed)
        self.heads = [
            keras.Sequential(
                [
                    keras.layers.Dense(32, activation="relu", kernel_initializer=init),
                    keras.layers.Dense(n_sources, kernel_initializer=init),
                ],
                name=f"source_head_{label}",
            )
            for label in (0, 1)
        ]
        self.bce = keras.losses.BinaryCrossentropy(reduction="none")
        self.cce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.source_tracker = keras.metrics.Mean(name="source_loss")

    def call(self, x: Any, training: bool = False) -> Any:
        return self.classifier(x, training=training)

    def features(self, x: Any, training: bool) -> Any:
        h = x
        for layer in self.classifier.layers[:-1]:
            h = layer(h, training=training)
        return h

    def train_step(self, data: Any) -> dict[str, Any]:
        x, target, w = data
        label = target[:, :1]
        source = tf.cast(target[:, 1], tf.int32)
        with tf.GradientTape() as tape:
            h = self.features(x, training=True)
            p = self.classifier.layers[-1](h, training=True)
            label_loss = tf.reduce_sum(w * self.bce(label, p)) / tf.reduce_sum(w)
            reversed_h = self.reverse(h)
            source_loss = 0.0
            for value, head in enumerate(self.heads):
                mask = tf.cast(tf.equal(label[:, 0], float(value)), tf.float32)
                per = self.cce(source, head(reversed_h, training=True))
                source_loss += tf.reduce_sum(mask * per) / tf.maximum(tf.reduce_sum(mask), 1.0)
            loss = label_loss + self.weight * source_loss
        variables = self.trainable_variables
        grads = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(grads, variables, strict=True))
        self.loss_tracker.update_state(label_loss)
        self.source_tracker.update_state(source_loss)
        return {"loss": self.loss_tracker.result(), "source_loss": self.source_tracker.result()}

    @property
    def metrics(self) -> list[Any]:
        return [self.loss_tracker, self.source_tracker]
