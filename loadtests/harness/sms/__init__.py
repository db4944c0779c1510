"""The SMS benchmark's parts (loadtests/bench_sms.py, sms_breakdown.py, slowloris.py)."""
