"""Small real models for tests, samples and benchmarks (trained in seconds)."""
