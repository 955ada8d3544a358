"""MetaSchedule tuning of a model's kernels: search spaces, tasks, verification, tuning logs.

`spaces`  the hand-scheduled integer kernels as MetaSchedule design spaces (tiles as sampled decisions)
`tasks`   a lowered model's kernels as tuning tasks, keyed on their definitions
`measure` in-process builder, local / RPC runner
`verify`  every tuned kernel against its definition before it is accepted
`tune`    the `repq-tvm tune` driver (budget by run-time share, resumable, progress)
`log`     the tuning-log folder and how `compile --tuning-log` applies it
"""
