"""The package version, the one place it is set (pyproject reads it; ``fl_rpn.__version__`` re-exports it)."""

__version__ = "0.1.0"
