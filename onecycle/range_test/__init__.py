"""The LR range test: the sweep and the curve math that reads a max LR off it."""
