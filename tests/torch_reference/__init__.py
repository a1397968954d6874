"""PyTorch references of the seed's caches and of MiniLLM, and converters to and from JAX."""
