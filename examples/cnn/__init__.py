"""A CNN trained with jaxbn normalization layers, laid out like flax's ``examples/imagenet``.

``main.py`` is the command line, ``train.py`` the training library, ``models.py`` the network
with its normalization injected, ``data.py`` the datasets and ``configs.py`` the presets.
"""
