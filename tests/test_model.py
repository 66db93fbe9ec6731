"""pifa.model: finding blocks and linears, module surgery."""

from __future__ import annotations

import pytest
import torch

from helpers import bare_linear_blocks
from pifa import CompressionConfig, compress


def test_a_list_of_bare_linears_is_no_block_list_and_gets_no_junk_submodule():
    model = bare_linear_blocks()
    names = [name for name, _ in model.named_modules()]
    with pytest.raises(ValueError, match="no block list found"):
        compress(model, CompressionConfig(method="svd"), torch.randint(0, 16, (4, 8)), progress=False)
    assert [name for name, _ in model.named_modules()] == names  # no submodule named '' attached
    from pifa.model import set_module, target_linears

    assert target_linears(model.layers[0], "layers.0", (), ()) == {}
    with pytest.raises(ValueError, match="cannot replace Linear itself"):
        set_module(model.layers[0], "", torch.nn.Identity())
