"""Reading the user's model and data (never written)."""
