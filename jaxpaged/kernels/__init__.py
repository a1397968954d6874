"""GPU kernels that read the block pools directly. Each lowering lives in its own file."""
