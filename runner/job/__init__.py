"""The job layer: the spec (`spec`), the plan (`shards`), the run folder (`run_folder`), the driver's
orchestration (`run`), run figures (`stats`), a generic Ray actor pool (`ray_pool`, the only module
that imports Ray) and the torch-only worker (`worker`)."""
