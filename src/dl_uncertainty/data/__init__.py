"""The data layer: readers (tables, images, benchmarks, S3), cleaning, splits and their files,
and the conversion of raw served inputs to model rows.
"""
