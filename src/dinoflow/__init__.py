"""dinoflow: learn and compare self-supervised image representations on a captioned image collection."""

__version__ = "0.1.0"
