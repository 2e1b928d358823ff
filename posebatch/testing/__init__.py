"""Real servers and worker processes for tests and bench/: redis-server, SeaweedFS, workers.

Why in the package: tests/ and bench/ both start them, and bench must not import tests/.
"""
