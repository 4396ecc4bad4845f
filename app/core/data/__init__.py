"""Datasets: read files, detect and normalise formats, validate every row, tokenise, measure."""
