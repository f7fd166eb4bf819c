"""evalgap._random.random_states_kept: every random state a measurement may draw from comes back."""

from __future__ import annotations

import random

import numpy as np
import pytest

from evalgap._random import random_states_kept


def _draws(torch=None, generator=None):
    out = [random.random(), float(np.random.random())]
    if torch is not None:
        out.append(float(torch.rand(())))
        out.append(float(torch.rand((), generator=generator)))
    return out


def test_python_numpy_torch_and_a_loader_generator_come_back_even_on_error():
    torch = pytest.importorskip("torch")
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    g = torch.Generator().manual_seed(5)
    expected = _draws(torch, g)  # what the run draws next without a measurement in between
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    g.manual_seed(5)
    with pytest.raises(RuntimeError):
        with random_states_kept(generators=[g]):
            _draws(torch, g), _draws(torch, g)
            raise RuntimeError("interrupted measurement")
    assert _draws(torch, g) == expected


def test_only_the_states_asked_for_are_put_back():
    random.seed(2), np.random.seed(2)
    first_python, first_numpy = random.random(), float(np.random.random())
    random.seed(2), np.random.seed(2)
    with random_states_kept(python=False):
        random.random(), np.random.random()
    assert random.random() != first_python  # not kept: the draw inside moved it on
    assert float(np.random.random()) == first_numpy
