"""svp's version, in one place: ``svp.__version__``, ``svp --version``, ``svp doctor``, each run's
train.log and results.json, and the package's metadata (pyproject.toml reads it from this file
without importing svp). Like ``errors``, every room may import it."""
__version__ = "0.1.0"
