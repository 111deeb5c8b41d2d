"""The activation table: names, aliases and maths as the adapters library / transformers define them."""
import pytest
import torch

from adapterkern.activations import ACTIVATION_NAMES, get_activation
from conftest import ACTIVATIONS, REF_ALIASES, reference_activation


@pytest.mark.parametrize("name", sorted(ACTIVATION_NAMES))
def test_torch_function_matches_formula(name):
    h = torch.randn(1000, dtype=torch.float64) * 4
    torch.testing.assert_close(get_activation(name).fn(h), reference_activation(name)(h), rtol=1e-12, atol=1e-12)


def test_aliases_and_case():
    for alias, target in REF_ALIASES.items():
        assert get_activation(alias) == get_activation(target)
    assert get_activation("ReLU") == get_activation("relu")
    assert get_activation(None).name == "linear"
    assert sorted({get_activation(n).kernel_id for n in ACTIVATIONS}) == list(range(10))


def test_unknown_activation():
    with pytest.raises(ValueError, match="unknown name 'mish'.*gelu"):
        get_activation("mish")
    with pytest.raises(TypeError, match="activation"):
        get_activation(1)
