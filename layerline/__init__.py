"""Above every role: the cluster launcher and the `layerline` command."""
