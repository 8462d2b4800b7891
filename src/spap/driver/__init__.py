"""The sequential driver: layer-by-layer pruning, where layers come from and go to, activation
stores and the physical cut of a layer."""
