"""Data in: sources and archives, image folders, the prepared form, class subsets."""
