"""evalgap.tf_keras offers the public names and signatures of evalgap.keras; its remedies import without Keras."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import evalgap.tf_keras as eg


def test_same_public_names_and_signatures_as_evalgap_keras():
    keras3 = pytest.importorskip("keras")
    if not keras3.__version__.startswith("3."):
        pytest.skip("Keras 3 is not installed")
    import evalgap.keras as k3

    assert eg.__all__ == k3.__all__
    for name in eg.__all__:
        ours, theirs = getattr(eg, name), getattr(k3, name)
        ours, theirs = (ours.__init__, theirs.__init__) if inspect.isclass(ours) else (ours, theirs)
        params = [[(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()] for f in (ours, theirs)]
        assert params[0] == params[1], name  # the same arguments (the return types name each framework's classes)


def test_remedies_need_no_framework():
    code = "import sys, evalgap.tf_keras.remedies as r; print(r.REMEDIES.recalibrate()); print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["import", "evalgap.tf_keras", "evalgap.tf_keras.recalibrate(model,", "train_data)", "False"]
