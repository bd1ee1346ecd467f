"""okome-image: golden SD-card images for the OKOME edge-cache cluster."""
