"""Exports of a finished job's results for annotation tools and training (``posebatch export``)."""
