"""Data in: sources and archives, image folders, the prepared form and its splits, class subsets."""
