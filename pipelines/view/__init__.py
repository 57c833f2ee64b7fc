"""The view stage: query results as one self-contained HTML page, faces marked by identity."""
