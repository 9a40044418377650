"""Data pipeline: sources → chat templates and loss masks → image slots → packing → batches."""
