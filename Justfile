# tpm tasks. `pip install rust-just` provides `just`.

# create .venv and install tpm with its pinned torch pair
setup:
    python3 -m venv .venv
    .venv/bin/pip install -c constraints.txt -e ".[dev]"

# the test suite (same command as CI)
test:
    python -m pytest -q -n 2

# fast tests only
test-fast:
    python -m pytest -q -n 2 -m "not slow"

# benchmarks: each prints JSON
bench:
    python benchmarks/bench_sampler.py
    python benchmarks/bench_rewards.py
    python benchmarks/bench_grpo.py
    python benchmarks/reward_server_load.py

lint:
    ruff check tpm policies rewards recipes tests benchmarks
