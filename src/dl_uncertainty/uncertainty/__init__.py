"""The uncertainty layer: the Monte-Carlo engine, the served prediction, metrics, calibration,
conformal sets and saliency. It knows model families only through their contract.
"""
