"""What people look at: figures, evaluation numbers, markdown tables."""
