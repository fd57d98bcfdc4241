"""The version of jaxbn: the single source read by ``pyproject.toml`` and ``jaxbn.__version__``."""

__version__ = "0.2.0.dev0"
