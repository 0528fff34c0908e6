"""`python -m leukfed.simulations.bench ...`: the same commands as `leuk bench ...`."""
from leukfed.common.cli_support import run_app
from leukfed.simulations.bench import bench_app

run_app(bench_app)()
