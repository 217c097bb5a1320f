"""specgate load testing: the load generator (`specgate loadtest`) and the fake engine (`specgate fake-engine`)."""
