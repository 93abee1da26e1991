"""docs/layers.md is the importer's own registry, and an unsupported layer is named by module path and type."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fleet.compiler.torch_import import UnsupportedLayerError, import_torch
from fleet.compiler.torch_trace import LAYERS_DOC_HEAD, layers_markdown
from tests.conftest import ROOT


def test_docs_layers_md_is_generated_from_the_importer_registry():
    # Execute
    doc = (ROOT / "docs" / "layers.md").read_text()
    # Assert (regenerate: python -m fleet.compiler.torch_trace > docs/layers.md)
    assert doc == LAYERS_DOC_HEAD + layers_markdown()


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(6, 6, 3, padding=1))
        self.rnn = nn.LSTM(6, 16, batch_first=True)
        self.pool = nn.MaxPool1d(2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):  # (N, 6, 10)
        y, _ = self.rnn(self.body(x).transpose(1, 2))
        return self.fc(torch.sigmoid(self.pool(y.transpose(1, 2)).mean(2)))


def test_every_unsupported_layer_is_named_by_module_path_and_type_at_once():
    # Execute
    with pytest.raises(UnsupportedLayerError) as e:
        import_torch(_Recurrent(), torch.randn(4, 6, 10))
    # Assert: the LSTM by its path and type (not the getitem that unpacks its tuple), and every other one too
    msg = str(e.value)
    assert "'rnn' (LSTM)" in msg and "'pool' (MaxPool1d)" in msg and "'sigmoid' (sigmoid)" in msg, msg
    assert "getitem" not in msg and e.value.layer == "rnn" and "docs/layers.md" in msg
