"""The model families, behind one contract, found through the registry."""
