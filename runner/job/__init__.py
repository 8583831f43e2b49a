"""The job layer: the spec (`spec`), the plan (`shards`), the run folder (`run_folder`), the driver's
orchestration (`run`) and what it reports as it goes (`events`), run figures (`stats`), a generic Ray
actor pool (`ray_pool`, the only module that imports Ray, with its bookkeeping in `in_flight`), the job's
workers on that pool (`shard_pool`) and the torch-only worker (`worker`)."""
