"""`cinefx train-preset`: datasets (`data`), the training loop (`loop`), preset export (`export`)."""
