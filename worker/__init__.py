"""Celery workers: decode, preprocess and classify chunks of images in batches."""
