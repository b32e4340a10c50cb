"""What the DVC stages share: the stage runner and the checks before any stage."""
