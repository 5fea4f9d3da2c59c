"""Running a playbook's tasks on Dask distributed workers near their hosts (docs/cluster.md).

The controller keeps everything that decides a run (task graph, batches, limits, windows, approvals,
audit trail, run state, console); workers only run tasks and stream their events back.

- `address.py`: the `--cluster` value (`local:N`, `tcp://HOST:PORT`, `tls://HOST:PORT`) and zone names
- `routing.py`: which worker runs each host's tasks (sticky per run, by zone, spread evenly)
- `wire.py`: what crosses between controller and workers
- `worker.py`: the worker side: one actor per run and worker, holding the run's SSH connections
- `remote.py`: the controller side: the task pool that replaces the in-process thread pool
- `delivery.py`: the controller's delivery thread: worker streams re-emitted in order, outcomes applied
- `client.py`: opening the Dask client (and the local cluster of `local:N`)
- `secrets.py`: which secrets a step reads, so that only they travel with its tasks
- `hostkeys.py`: the controller's known_hosts for workers, and the keys they learn (accept-new)
- `launch.py`: a prepared run on a cluster: reach it, route, set the workers up, execute
"""
