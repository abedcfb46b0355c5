"""Ray jobs: tokenize, train, evaluate, demo. Each module is a `ray job submit` entrypoint."""
