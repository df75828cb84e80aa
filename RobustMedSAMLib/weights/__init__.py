"""Where the weights come from: checkpoint files, the model registry, downloads and
the loader that turns a model name into a ready predictor."""
