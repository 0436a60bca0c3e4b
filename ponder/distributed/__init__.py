"""Scale-out: engine replicas as Ray actors, the router in front of them, prefill/decode disaggregation.

Nothing here imports Ray at module level except the modules that run on it; `ponder serve` without
`--replicas` imports none of them.
"""
