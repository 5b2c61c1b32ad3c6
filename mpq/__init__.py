"""mpq: mixed-precision quantization search."""
