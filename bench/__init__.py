"""The provisioner's benchmark: every figure beside a raw floor measured in the same run.

    bench/run            # the full run, for people (large N; flags choose N)
    bench/run --quick    # small N, a few minutes: what CI runs so the bench never rots

One module per thing measured (webhook_latency, signup, health_sweep, converge,
nginx_regen, memory, storage, admin_list, batching); `stack` is the throwaway
provisioner they share (its own nginx on loopback ports, `provisioner serve` as a
subprocess, containers labelled with the run's installation id and removed on exit).
"""
