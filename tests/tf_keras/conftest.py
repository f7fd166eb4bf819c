"""Keras 2 tests run in their own process, with TF_USE_LEGACY_KERAS=1 set before TensorFlow is imported."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("tf_keras", reason="tf-keras is not installed (pip install 'evalgap[tf-keras]')")


def _two_logical_cpus() -> None:
    """Two logical CPU devices for the MirroredStrategy test (possible only before TensorFlow initializes its devices)."""
    import tensorflow as tf

    try:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    except RuntimeError:  # already initialized (another test folder in this process): that test skips
        pass


_two_logical_cpus()


def pytest_report_header(config):
    return f"tf_keras {keras.__version__}"


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()
