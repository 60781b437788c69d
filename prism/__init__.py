"""prism: robust and balanced LLM unlearning (PRISM, arXiv 2509.23362) on PyTorch Lightning."""

__version__ = "0.1.0"
