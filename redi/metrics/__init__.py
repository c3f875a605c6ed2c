"""ADM-protocol evaluation: Inception features, FID, sFID, IS, precision/recall."""
