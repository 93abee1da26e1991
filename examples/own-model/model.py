"""A small CNN for sklearn's 8x8 handwritten digits: ``(N, 1, 8, 8)`` float in [0, 1] -> ``(N, 10)`` logits.

About 3.9k parameters, built only from layers ``tinyfleet compile`` supports (docs/layers.md): two conv + batch
norm + ReLU blocks, flatten, linear. No arguments to the constructor, so ``model:DigitsCNN`` is enough to build it.
"""

from torch import nn


class DigitsCNN(nn.Module):
    """conv 1->8 (8x8), conv 8->16 stride 2 (4x4), flatten, linear 256->10."""

    input_shape = (1, 8, 8)  # per sample; `tinyfleet compile` and `simulate` read it if the config does not say

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.classifier = nn.Linear(16 * 4 * 4, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))
