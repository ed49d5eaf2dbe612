"""Cross-request batching: windows of many requests decoded together through one model."""
