"""CorInfoMax: train, export and serve self-supervised image embeddings (import names under `corinfomax.`)."""
