"""Stage 1: train CorInfoMax backbones on unlabelled images and evaluate them (kNN, linear probe)."""
