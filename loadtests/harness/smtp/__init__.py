"""The SMTP benchmark's parts (loadtests/bench_smtp.py); the list is in harness/__init__.py."""
