"""The benchmark harness behind loadtests/bench_smtp.py and loadtests/bench_sms.py.

The scripts in loadtests/ are the entry points (argument parsing and the order of the runs);
they put loadtests/ on sys.path by being run from there, which is how this package and the
functions that multiprocessing's "spawn" children run are found.

Shared by both benchmarks:

    common   constants, the event loop, free ports, percentiles, spawned server children
    tls      the throwaway CA and certificate, TLS 1.3 contexts
    host     the host's speed and the audit disk's fsync latency
    cpu      CPU accounting of the benchmark's processes and of everything else

smtp/ (bench_smtp.py): sink (the lean SMTP sink), sink_process (the sink child), relay (the
bare relay and its valkey-server), client, gateway (`optgate serve` as a subprocess),
postfix, opendkim (the milter of the Postfix + OpenDKIM row), dkimkey (the bench DKIM key
and the check of a received message), profiler (py-spy), bench (starting the targets, one
measured run), report.

sms/ (bench_sms.py, sms_breakdown.py, slowloris.py): load (the request and the result
types), provider (the stub provider and the bare proxy), client (wrk or Python), gateway,
report.
"""
