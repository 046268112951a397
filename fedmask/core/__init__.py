"""What every party builds the same way from a seed: frozen weights, models, data and its
partitions, masked layers, and the local training loop."""
