"""Training: data, loops and the end-to-end jobs."""
