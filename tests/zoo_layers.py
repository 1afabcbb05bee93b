"""A custom layer registered with Keras, importable by the workers (tests/ is on sys.path)."""

import keras


@keras.saving.register_keras_serializable(package="kerasfleet_tests")
class ScaledDense(keras.layers.Layer):
    def __init__(self, units, scale=2.0, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.scale = scale

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), initializer="glorot_uniform")
        self.bias = self.add_weight(shape=(self.units,), initializer="zeros")

    def call(self, x):
        return keras.ops.tanh(keras.ops.matmul(x, self.kernel) + self.bias) * self.scale

    def get_config(self):
        return {**super().get_config(), "units": self.units, "scale": self.scale}


@keras.saving.register_keras_serializable(package="kerasfleet_tests")
class SpectrumMagnitude(keras.layers.Layer):
    """|FFT| of each row: fine in Keras on every backend, but ONNX has no complex tensors."""

    def call(self, x):
        real, imag = keras.ops.fft((x, keras.ops.zeros_like(x)))
        return keras.ops.sqrt(real * real + imag * imag)
